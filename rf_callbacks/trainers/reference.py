"""The reference model of `RFDPOTrainer` and `RFGRPOTrainer`: the shared base with adapters disabled.

TRL's `DPOTrainer` and `GRPOTrainer`, handed a `PeftModel` and no `ref_model`, copy the model's "default" adapter into
a frozen "ref" adapter and use it as the reference. Every run here starts from a fresh LoRA (B = 0), whose model
equals the base, so the reference is the base with adapters disabled, computed once for all runs:
`no_ref_adapter_copy` keeps TRL from adding that copy (which would also fail: run adapters are named after the runs,
not "default"). A `PeftModel` the user built, or a given `ref_model`, is referenced as TRL references it
(`reference_context`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

from peft import PeftModel

from ..configs import RunSpec


def reference_context(model, user_peft: bool, ref_model=None) -> AbstractContextManager:
    """The context the TRL parent is built in: `no_ref_adapter_copy` for runs' fresh adapters on a plain model with no
    `ref_model`; nothing for a `PeftModel` the user built (TRL's own frozen copy of its adapter) or a given
    `ref_model`."""
    if isinstance(model, PeftModel) and not user_peft and ref_model is None:
        return no_ref_adapter_copy(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def no_ref_adapter_copy(model) -> Iterator[None]:
    """While a TRL preference or RL trainer is built around `model` (a `PeftModel` holding one fresh adapter per run),
    keep it from adding its frozen "ref" adapter copy, so the reference stays the shared base with adapters disabled.

    TRL reads `model.peft_config["default"]` and calls `model.add_adapter("ref", ...)`, then copies the "default"
    weights into it; the first is answered with the first run's config and the second is skipped. A run named
    "default" has weights TRL copies: its copy is made, then deleted. Everything is undone on exit.
    """
    configs = model.peft_config
    alias = "default" not in configs
    original = model.add_adapter
    if alias:
        configs["default"] = next(iter(configs.values()))

        def add_adapter(adapter_name, peft_config, *args, **kwargs):
            if adapter_name == "ref":
                return None
            return original(adapter_name, peft_config, *args, **kwargs)

        model.add_adapter = add_adapter
    try:
        yield
    finally:
        if alias:
            del model.add_adapter
            configs.pop("default", None)
        elif "ref" in model.peft_config:
            active = model.active_adapter
            model.delete_adapter("ref")
            model.set_adapter(active if active != "ref" else "default")
    if "ref" in model.peft_config:
        raise RuntimeError("TRL added a 'ref' adapter copy; the reference must be the shared base")


def refuse_ref_name(specs: list[RunSpec]) -> None:
    """TRL treats an adapter named "ref" as the reference model: no run may be called that."""
    for index, spec in enumerate(specs):
        if spec.adapter_name == "ref":
            raise ValueError(
                f"configs[{index}] ({spec.name!r}): name='ref' is reserved (TRL uses an adapter named 'ref' as the "
                "reference model); choose another name"
            )
