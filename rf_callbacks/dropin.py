"""Drop-in mode: an RF trainer built without `configs` and without any engine option is its TRL parent.

`RFSFTTrainer(model, args, train_dataset, peft_config=...)` must accept, train, save and refuse exactly what
`SFTTrainer(...)` does, for every model (full fine-tuning, a user-built `PeftModel` of any PEFT method, a hub id with
`model_init_kwargs`), every data set (`IterableDataset` included) and every argument. Re-implementing all of that
in the engine would be a second `Trainer`; instead, when nothing asks for the engine, `__init__` is the parent's
`__init__` and the engine's overrides (`train`, `training_step`, `evaluate`, ...) call the parent's method.

The engine is used when `configs` is given (even one config: `configs=[{}]`) or when an option only the engine
has is set away from its default: `num_chunks`, `dashboard`, `policies`, `boundary_eval`, `checkpoint_every`,
`fused`, `max_fused`, `oom_retry`, `parallel`. `control_socket` and `offload_optimizer` change nothing for a plain
single run, so they do not turn the engine on.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .rf_args import RF_OPTIONS, with_options

# Options that only tune the engine; ignored in drop-in mode.
PASSIVE_OPTIONS = ("control_socket", "offload_optimizer")
# Engine options and the defaults that leave an RF trainer in drop-in mode.
ENGINE_OPTIONS: dict[str, Any] = {
    "configs": None,
    **{name: default for name, default in RF_OPTIONS.items() if name not in PASSIVE_OPTIONS},
}

# The `Trainer` methods the engine overrides: in drop-in mode each is the parent's.
ENGINE_OVERRIDES = (
    "train",
    "_inner_training_loop",
    "training_step",
    "evaluate",
    "_save",
    "_clip_grad_norm",
    "floating_point_ops",
    "get_decay_parameter_names",
)
# Public engine methods: in drop-in mode they say how to turn the engine on.
ENGINE_METHODS = ("results", "select_run", "stop", "resume", "delete", "clone", "submit_op", "handle_request")


def uses_engine(given: dict[str, Any]) -> bool:
    """Whether the arguments an RF trainer was called with ask for the multi-run engine."""
    return any(name in given and given[name] != default for name, default in ENGINE_OPTIONS.items())


def trl_parent(cls: type) -> type:
    """The TRL (or transformers) trainer class an RF trainer class subclasses."""
    return next(base for base in cls.__mro__ if base.__module__.startswith(("trl.", "transformers.")))


def drop_in(cls: type) -> type:
    """Class decorator for an RF trainer: build and behave as its TRL parent unless the engine is asked for."""
    parent = trl_parent(cls)
    engine_init = with_options(cls.__init__)  # `**options` spelled out: what callers, `help()` and binding see
    signature = inspect.signature(engine_init)
    own = set(ENGINE_OPTIONS) | set(PASSIVE_OPTIONS)

    @functools.wraps(engine_init)
    def __init__(self, *args, **kwargs) -> None:
        given = signature.bind(self, *args, **kwargs).arguments
        self._rf_engine = uses_engine(given)
        if self._rf_engine:
            engine_init(self, *args, **kwargs)
            return
        parent.__init__(self, **{name: value for name, value in given.items() if name != "self" and name not in own})

    cls.__init__ = __init__
    for name in ENGINE_OVERRIDES:
        setattr(cls, name, _parent_unless_engine(getattr(cls, name), getattr(parent, name)))
    for name in ENGINE_METHODS:
        setattr(cls, name, _engine_only(getattr(cls, name), cls.__name__, parent.__name__))
    for name in ("runs", "active_run"):
        prop = getattr(cls, name)
        setattr(cls, name, property(_engine_only(prop.fget, cls.__name__, parent.__name__), doc=prop.__doc__))
    close = cls.close
    cls.close = functools.wraps(close)(lambda self: close(self) if self._rf_engine else None)
    return cls


def _parent_unless_engine(method: Callable, parent_method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self._rf_engine:
            return method(self, *args, **kwargs)
        return parent_method(self, *args, **kwargs)

    return wrapped


def _engine_only(method: Callable, name: str, parent: str) -> Callable:
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if not self._rf_engine:
            raise RuntimeError(
                f"{method.__name__}() is part of the rf-callbacks engine, but this {name} was built without "
                f"configs, so it is a plain {parent}; pass configs=[...] (one config is enough: configs=[{{}}]) "
                "to train through the engine"
            )
        return method(self, *args, **kwargs)

    return wrapped
