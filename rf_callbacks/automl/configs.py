"""RapidFire-style configs: `RFLoraConfig`, `RFSFTConfig`, `RFDPOConfig`, `RFGRPOConfig` and `RFModelConfig`.

The `RF*Config` classes are PEFT's `LoraConfig` and TRL's `SFTConfig`/`DPOConfig`/`GRPOConfig` that also accept a
`List([...])` or `Range(...)` for any field. Without one they *are* the parent: the same constructor, defaults and
`__post_init__` validation, so `RFSFTConfig(...)` can be handed to `RFSFTTrainer` (or TRL's `SFTTrainer`) as it is.
With one, the object is a template: the parent's validation is deferred (it would reject a `List` learning rate, and
a field may only be valid in combination with another one that is still open), the fields hold the given values
with the parent's defaults elsewhere, and each concrete leaf a search makes from it is built by calling the class
again with concrete values, which runs the parent's full validation then.

`RFModelConfig` describes one run (or, holding `List`s, many): the base model, its tokenizer, the data formatting,
the adapter, the training arguments and the evaluation-time generation metrics.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig
from trl import DPOConfig, GRPOConfig, SFTConfig

from .space import List, has_space

__all__ = ["RFDPOConfig", "RFGRPOConfig", "RFLoraConfig", "RFModelConfig", "RFSFTConfig", "TRAINING_ARGS_CLASSES"]


class _Searchable:
    """Front mixin: keeps the arguments the user gave and defers the parent's validation while any holds a space."""

    def __init__(self, *args: Any, **kwargs: Any):
        names = [f.name for f in dataclasses.fields(self) if f.init]
        cls = type(self).__name__
        if len(args) > len(names):
            raise TypeError(f"{cls}() takes at most {len(names)} positional arguments, got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{cls}() got multiple values for argument {name!r}")
            kwargs[name] = value
        object.__setattr__(self, "_rf_ready", False)
        object.__setattr__(self, "_rf_user_params", dict(kwargs))
        if has_space(kwargs):
            unknown = sorted(set(kwargs) - set(names))
            if unknown:
                raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {unknown[0]!r}")
            for f in dataclasses.fields(self):
                if f.name in kwargs:
                    value = kwargs[f.name]
                elif f.default is not dataclasses.MISSING:
                    value = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    value = f.default_factory()
                else:
                    value = None
                object.__setattr__(self, f.name, value)
        else:
            if self._rf_bf16_default_off(kwargs):
                kwargs = {**kwargs, "bf16": False}
            super().__init__(**kwargs)
        object.__setattr__(self, "_rf_ready", True)

    def _rf_bf16_default_off(self, kwargs: dict[str, Any]) -> bool:
        """TRL's configs default `bf16` to True, which transformers then rejects on a machine with no bf16 device
        unless `use_cpu=True` (and which runs 30x slower there). Only in that case, and only when `bf16` was not
        given, the RF classes default it to False instead; an explicit value is validated as the parent does."""
        if "bf16" not in self.__dataclass_fields__ or "bf16" in kwargs or kwargs.get("fp16") or kwargs.get("use_cpu"):
            return False
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        return not is_torch_bf16_gpu_available() and not is_torch_xla_available()

    def __setattr__(self, name: str, value: Any) -> None:
        # After construction, an assignment to a constructor field is a user edit: the leaves built from this object
        # must see it (the parent's own __post_init__ assignments happen before `_rf_ready` is set).
        field = self.__dataclass_fields__.get(name)
        if self.__dict__.get("_rf_ready") and field is not None and field.init:
            self._rf_user_params[name] = value
        super().__setattr__(name, value)

    def _rf_params(self) -> dict[str, Any]:
        """The constructor arguments given (and later edits), possibly holding `List`/`Range` values."""
        return dict(self._rf_user_params)

    def _rf_build(self, params: dict[str, Any]):
        """A new object of this class from concrete `params`: the parent's validation runs here."""
        return type(self)(**params)

    @property
    def user_params(self) -> dict[str, Any]:
        """The fields the user set (searchable values included), as opposed to the parent's defaults."""
        return dict(self._rf_user_params)

    def copy(self):
        """A new object with the same user arguments (RapidFire AI's `copy()`)."""
        return type(self)(**copy.deepcopy(self._rf_user_params))

    def __repr__(self) -> str:
        if has_space(self._rf_user_params):
            args = ", ".join(f"{key}={value!r}" for key, value in self._rf_user_params.items())
            return f"{type(self).__name__}({args})"
        return super().__repr__()


class RFLoraConfig(_Searchable, LoraConfig):
    """`peft.LoraConfig` whose fields may also be `List([...])` or `Range(...)`."""


class RFSFTConfig(_Searchable, SFTConfig):
    """`trl.SFTConfig` whose fields may also be `List([...])` or `Range(...)`."""


class RFDPOConfig(_Searchable, DPOConfig):
    """`trl.DPOConfig` whose fields may also be `List([...])` or `Range(...)`."""


class RFGRPOConfig(_Searchable, GRPOConfig):
    """`trl.GRPOConfig` whose fields may also be `List([...])` or `Range(...)`."""


# What `training_args` must be for each `trainer_type` (the RF classes are subclasses, so both are accepted).
TRAINING_ARGS_CLASSES = {"SFT": SFTConfig, "DPO": DPOConfig, "GRPO": GRPOConfig}
RF_TRAINING_ARGS_CLASSES = {"SFT": RFSFTConfig, "DPO": RFDPOConfig, "GRPO": RFGRPOConfig}


@dataclass
class RFModelConfig:
    """One run to train, or with `List`s in any field, a family of runs.

    Args:
        model_name (`str`): Hub id or local path of the base model; passed to your `create_model_fn`.
        tokenizer (`str`, *optional*): Tokenizer id or path, passed to `create_model_fn`.
        tokenizer_kwargs (`dict`, *optional*): Passed to `create_model_fn`.
        formatting_func (`Callable`, *optional*): `row -> dict` applied once to every row of the train and eval data;
            for SFT the dict must hold `prompt`+`completion`, `messages` or `text`; for DPO `prompt`+`chosen`+
            `rejected`; for GRPO `prompt`.
        compute_metrics (`Callable`, *optional*): With `generation_config`, called at every evaluation as
            `compute_metrics((predictions, references))` with decoded generated texts and reference texts, returning
            `{name: number}` (logged as `eval_<name>`). Without `generation_config`, passed to the trainer as
            transformers' logits-based `compute_metrics`.
        peft_config (`LoraConfig` or `RFLoraConfig`): The run's adapter.
        training_args (`RFSFTConfig`/`RFDPOConfig`/`RFGRPOConfig`, or TRL's own config): must match the search's
            `trainer_type`; `None` uses that config's defaults.
        model_type (`str`, *optional*, defaults to `"causal_lm"`): Passed to `create_model_fn`.
        model_kwargs (`dict`, *optional*): Passed to `create_model_fn`; part of what makes a distinct base.
        ref_model_name, ref_model_type, ref_model_kwargs: DPO reference model (see the README's differences).
        reward_funcs: GRPO reward functions.
        generation_config (`dict`, *optional*): `model.generate()` keyword arguments for `compute_metrics`.
        num_gpus (`int`, *optional*): Accepted for compatibility; rf-callbacks trains on one device.
    """

    model_name: str | None = None
    tokenizer: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    formatting_func: Callable | List | None = None
    compute_metrics: Callable | List | None = None
    peft_config: LoraConfig | List | None = None
    training_args: SFTConfig | DPOConfig | GRPOConfig | List | None = None
    model_type: str | None = "causal_lm"
    model_kwargs: dict[str, Any] | None = None
    ref_model_name: str | None = None
    ref_model_type: str | None = None
    ref_model_kwargs: dict[str, Any] | None = None
    reward_funcs: Any = None
    generation_config: dict[str, Any] | None = None
    num_gpus: int | None = None

    def _rf_params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _rf_build(self, params: dict[str, Any]) -> RFModelConfig:
        return type(self)(**params)

    def copy(self) -> RFModelConfig:
        return copy.deepcopy(self)
