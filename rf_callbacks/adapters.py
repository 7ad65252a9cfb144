"""Adapters on the shared base: one PEFT adapter per run, created as TRL would and saved in PEFT's own format.

Each run's adapter is initialised right after `set_seed(run seed)`, exactly what `SFTTrainer.__init__` does before
`get_peft_model`, so a run's starting weights do not depend on which other runs share the base. Saving writes
`adapter_config.json` + `adapter_model.safetensors` directly into the folder (PEFT's `save_pretrained` would put any
adapter not named "default" into a sub-folder), so `PeftModel.from_pretrained(base, folder)` loads it.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from transformers import PreTrainedModel, set_seed

from .configs import RunSpec


def attach_adapters(model: PreTrainedModel | PeftModel, specs: Sequence[RunSpec]) -> PeftModel:
    """Wrap `model` in a `PeftModel` holding one adapter per spec, named after the run (a `PeftModel` gets the
    adapters added beside its own)."""
    peft_model = model if isinstance(model, PeftModel) else None
    for spec in specs:
        set_seed(spec.args.seed)
        with warnings.catch_warnings():
            # Short run names ("a", "lo") are substrings of the "lora_" prefix; PEFT warns about reloading such
            # names, which does not apply here: saved adapters load back under PEFT's default name.
            warnings.filterwarnings("ignore", message="Adapter name .* should not be contained in the prefix")
            try:
                if peft_model is None:
                    peft_model = get_peft_model(model, spec.peft_config, adapter_name=spec.adapter_name)
                else:
                    peft_model.add_adapter(spec.adapter_name, spec.peft_config)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"run {spec.name!r}: its peft_config cannot be applied to this model: {error}"
                ) from error
    if peft_model is None:  # no spec
        raise ValueError("attach_adapters needs at least one spec with a peft_config")
    return peft_model


def remove_adapters(model: PreTrainedModel, requires_grad: dict[str, bool]) -> None:
    """Undo what PEFT did to `model` in place (what `PeftModel.unload()` does, from the base alone): every LoRA
    layer back to the layer it wraps, no `peft_config`, and the parameters' `requires_grad` as it was."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))


def save_adapter(model: PeftModel, adapter_name: str, directory: str | os.PathLike) -> Path:
    """Write one adapter as a standalone PEFT checkpoint (files are written under temporary names, then renamed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tmp = directory / ".adapter_model.safetensors.tmp"
    save_file({key: value.detach().contiguous().cpu() for key, value in state_dict.items()}, tmp, {"format": "pt"})
    os.replace(tmp, directory / "adapter_model.safetensors")
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(directory))
    return directory
