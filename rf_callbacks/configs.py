"""Run configs: turn the user's `configs=[{...}, ...]` list into validated `RunSpec`s.

A config is a dict with an optional `name`, an optional `peft_config` and overrides of the training-argument fields
that may differ between runs sharing one process (learning rate, schedule, batch size, steps, ...). Everything is
checked here, before any model work starts, and every error names the config, the field and the value.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peft import PeftConfig
from transformers import TrainingArguments

# Fields of `TrainingArguments` that only touch a run's own optimisation, so runs in one process may differ in them.
TRAINING_PER_RUN_FIELDS = frozenset(
    {
        "learning_rate",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "optim",
        "optim_args",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "seed",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "eval_strategy",
        "eval_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
    }
)

# Fields that change the base model or the process; listed so the error can say why rather than "unknown".
PROCESS_WIDE_REASONS = {
    "bf16": "the base model's precision is shared by all runs",
    "fp16": "the base model's precision is shared by all runs",
    "tf32": "the base model's precision is shared by all runs",
    "use_cpu": "all runs share one device",
    "gradient_checkpointing": "checkpointing is set on the shared base model",
    "gradient_checkpointing_kwargs": "checkpointing is set on the shared base model",
    "activation_checkpointing": "checkpointing is set on the shared base model",
    "activation_checkpointing_kwargs": "checkpointing is set on the shared base model",
    "torch_compile": "compilation wraps the shared base model",
    "model_init_kwargs": "the base model is loaded once for all runs",
    "output_dir": "each run writes to <output_dir>/runs/<name> automatically",
    "data_seed": "all runs see the same chunks of the same shuffled data",
    "train_sampling_strategy": "all runs see the same chunks of the same shuffled data",
    "packing": "the packed data set is shared by all runs",
    "report_to": "reporters are set once for the whole experiment",
    "neftune_noise_alpha": "NEFTune hooks the shared embedding layer",
    "deepspeed": "distribution is set once per process",
    "fsdp": "distribution is set once per process",
    "auto_find_batch_size": "it retries the whole process with a new batch size",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-=+]{0,63}$")
_RESERVED_KEYS = {"name", "peft_config"}


@dataclass
class RunSpec:
    """What one run is asked to do: its name, its adapter config and its full training arguments.

    Args:
        name (`str`):
            Stable run id, used as the PEFT adapter name and the folder name under `<output_dir>/runs/`.
        peft_config ([`~peft.PeftConfig`] or `None`):
            The run's own copy of its adapter config; `None` for a single full fine-tuning run.
        overrides (`dict[str, Any]`):
            The training-argument fields this run sets itself, as the user gave them.
        args ([`~transformers.TrainingArguments`]):
            The shared arguments with `overrides` applied and `output_dir` pointing at the run's folder.
        parent (`str`, *optional*):
            The run this one was cloned from.
        own_adapter (`str`, *optional*):
            For the run that trains the adapter of a `PeftModel` the user built: that adapter's name.
    """

    name: str
    peft_config: PeftConfig | None
    overrides: dict[str, Any]
    args: TrainingArguments
    parent: str | None = None
    own_adapter: str | None = None

    @property
    def adapter_name(self) -> str:
        """The PEFT adapter's name: the user's own adapter's, or the run name with '.' replaced (PyTorch module names
        cannot hold dots)."""
        return self.own_adapter or self.name.replace(".", "_")

    def __post_init__(self):
        # Taken now: PEFT rewrites its config in place when the adapter is built ("all-linear" -> module names).
        self.summary = describe_config(self.peft_config, self.overrides)


def describe_config(peft_config: PeftConfig | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly view of a run's config: the PEFT fields that usually differ, plus the user's overrides."""
    described: dict[str, Any] = {}
    if peft_config is not None:
        described["peft_type"] = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
        for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora"):
            value = getattr(peft_config, key, None)
            if value is not None:
                described[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    described.update({key: _jsonable(value) for key, value in overrides.items()})
    return described


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)


@contextlib.contextmanager
def _keep_accelerate_state():
    """Building `TrainingArguments` sets up devices, which resets accelerate's process-wide state; put it back so a
    run's arguments made while a trainer exists (a clone) do not pull the state from under its `Accelerator`."""
    from accelerate.state import AcceleratorState, PartialState

    saved = dict(AcceleratorState._shared_state), dict(PartialState._shared_state)
    try:
        yield
    finally:
        for cls, state in zip((AcceleratorState, PartialState), saved):
            if state:
                cls._shared_state.clear()
                cls._shared_state.update(state)


def _suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _owner_config(key: str) -> str | None:
    """The TRL config class that has field `key` (for a per-run field given to another trainer)."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    return next((c.__name__ for c in (SFTConfig, DPOConfig, GRPOConfig) if key in c.__dataclass_fields__), None)


def _check_type(where: str, key: str, value: Any, current: Any) -> None:
    """Refuse values whose type cannot be what the field holds (a string learning rate, a float batch size)."""
    if value is None or current is None or isinstance(current, (dict, list, tuple)):
        return
    if isinstance(current, bool):
        ok = isinstance(value, bool)
        expected = "a bool"
    elif isinstance(current, int) and not isinstance(current, bool):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if key in ("warmup_steps", "num_train_epochs"):  # may be floats (a ratio, fractional epochs)
            ok = ok or isinstance(value, float)
        expected = "an int"
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    elif isinstance(current, str):
        ok = isinstance(value, str)
        expected = "a string"
    else:
        return
    if not ok:
        raise ValueError(f"{where}: {key} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_value(where: str, key: str, value: Any) -> None:
    """Range checks that `TrainingArguments.__post_init__` does not do itself."""

    def bad(rule: str) -> ValueError:
        return ValueError(f"{where}: {key}={value!r} is invalid; {rule}")

    if isinstance(value, float) and not math.isfinite(value):
        raise bad("it must be a finite number")
    if key == "learning_rate" and value < 0:
        raise bad("the learning rate must be >= 0")
    counts = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    if key in counts and value < 1:
        raise bad("it must be >= 1")
    if key in ("weight_decay", "max_grad_norm", "adam_epsilon", "num_train_epochs") and value < 0:
        raise bad("it must be >= 0")
    if key in ("adam_beta1", "adam_beta2") and not 0 <= value < 1:
        raise bad("it must be in [0, 1)")
    if key == "max_steps" and (value == 0 or value < -1):
        raise bad("use a positive number of steps, or -1 to train for num_train_epochs")
    if key == "warmup_steps" and value < 0:
        raise bad("it must be >= 0 (a step count, or a ratio in [0, 1))")
    if key == "seed" and value < 0:
        raise bad("it must be >= 0")
    if key == "max_length" and value is not None and value < 1:
        raise bad("it must be >= 1, or None for no truncation")


def _validate_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{where}: name={name!r} is invalid; use 1-64 characters from letters, digits, '_', '.', '-', '=', '+', "
            "starting with a letter or digit (it names the adapter and the run's folder)"
        )
    return name


def parse_configs(
    configs: Sequence[dict[str, Any]] | None,
    args: TrainingArguments,
    peft_config: PeftConfig | None,
    per_run_fields: frozenset[str],
    run_output_dir: Any,
    own_adapter: bool = False,
) -> list[RunSpec]:
    """Validate `configs` and build one `RunSpec` per entry.

    Args:
        configs (`Sequence[dict]` or `None`):
            The user's configs. `None` means one run from `peft_config` and `args` (plain TRL behaviour).
        args ([`~transformers.TrainingArguments`]):
            Shared defaults.
        peft_config ([`~peft.PeftConfig`], *optional*):
            Adapter config for configs that do not bring their own.
        per_run_fields (`frozenset[str]`):
            Argument fields a run may override (the trainer's own list).
        run_output_dir (`Callable[[str], str]`):
            Maps a run name to its output folder.
        own_adapter (`bool`, *optional*, defaults to `False`):
            Whether the model is a `PeftModel` whose own adapter one config without a `peft_config` trains.

    Returns:
        `list[RunSpec]`: one per config, in the given order.
    """
    if peft_config is not None and not isinstance(peft_config, PeftConfig):
        raise ValueError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    if configs is None:
        configs = [{}]
    elif isinstance(configs, dict) or not isinstance(configs, Sequence) or isinstance(configs, str):
        raise ValueError(f"configs must be a list of dicts, got {type(configs).__name__}")
    if len(configs) == 0:
        raise ValueError("configs is empty; pass at least one config dict, or leave configs=None for a single run")

    fields = {f.name for f in dataclasses.fields(args) if f.init}
    nullable = {f.name for f in dataclasses.fields(args) if "None" in str(f.type) or "Optional" in str(f.type)}
    allowed = {key for key in per_run_fields if key in fields} | {"warmup_ratio"}
    specs: list[RunSpec] = []
    names: dict[str, int] = {}
    for index, config in enumerate(configs):
        where = f"configs[{index}]"
        if not isinstance(config, dict):
            raise ValueError(f"{where} must be a dict, got {type(config).__name__}")
        name = _validate_name(where, config.get("name", f"run-{index + 1}"))
        where = f"configs[{index}] ({name!r})"
        if name in names:
            raise ValueError(f"{where}: duplicate run name {name!r} (also configs[{names[name]}])")
        clash = next((other for other in names if other.replace(".", "_") == name.replace(".", "_")), None)
        if clash is not None:
            raise ValueError(f"{where}: run names {clash!r} and {name!r} differ only by '.' vs '_'; rename one")
        names[name] = index

        run_peft = config.get("peft_config", peft_config)
        if run_peft is not None and not isinstance(run_peft, PeftConfig):
            raise ValueError(
                f"{where}: peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(run_peft).__name__}"
            )
        if run_peft is None and len(configs) > 1 and not own_adapter:
            raise ValueError(
                f"{where} has no peft_config and the trainer has none: several configs need one adapter each on "
                "the shared base model (full fine-tuning would need a copy of the model per run). Pass peft_config= "
                "to the trainer or a 'peft_config' in every config."
            )

        overrides = {key: value for key, value in config.items() if key not in _RESERVED_KEYS}
        for key, value in overrides.items():
            if key in allowed:
                continue
            if key in PROCESS_WIDE_REASONS or key in fields:
                reason = PROCESS_WIDE_REASONS.get(key, "it is set once for the trainer, not per run")
                raise ValueError(
                    f"{where}: {key}={value!r} cannot differ per run in one process ({reason}); set it in args instead"
                )
            other = _owner_config(key)
            if other is not None:
                raise ValueError(
                    f"{where}: {key!r} is a field of {other}, not of {type(args).__name__}; this trainer does not "
                    "take it"
                )
            raise ValueError(f"{where}: unknown field {key!r}{_suggest(key, sorted(allowed | _RESERVED_KEYS))}")

        if "warmup_ratio" in overrides:  # transformers 5 folded the ratio into warmup_steps (a float below 1)
            ratio = overrides.pop("warmup_ratio")
            if "warmup_steps" in overrides:
                raise ValueError(f"{where}: set warmup_ratio or warmup_steps, not both")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
                raise ValueError(f"{where}: warmup_ratio={ratio!r} is invalid; it must be a number in [0, 1)")
            overrides["warmup_steps"] = float(ratio)
        for key, value in overrides.items():
            if value is None and key not in nullable:
                raise ValueError(f"{where}: {key}=None is invalid; give a value (or leave the field out)")
            _check_type(where, key, value, getattr(args, key))
            _check_value(where, key, value)
        if "num_train_epochs" in overrides and "max_steps" not in overrides and args.max_steps > 0:
            raise ValueError(
                f"{where}: num_train_epochs={overrides['num_train_epochs']!r} would be ignored because "
                f'args.max_steps={args.max_steps} takes precedence; add "max_steps": -1 to this config'
            )
        _check_value(where, "learning_rate", overrides.get("learning_rate", args.learning_rate))

        try:
            with _keep_accelerate_state():
                run_args = dataclasses.replace(args, **overrides, output_dir=str(run_output_dir(name)))
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{where}: {error}") from error
        user_overrides = {key: value for key, value in config.items() if key not in _RESERVED_KEYS}
        specs.append(RunSpec(name, copy.deepcopy(run_peft), user_overrides, run_args))

    adapters = [spec for spec in specs if spec.peft_config is not None]
    kinds = {str(spec.peft_config.peft_type) for spec in adapters}
    if len(kinds) > 1:
        listing = ", ".join(f"{spec.name}: {spec.peft_config.peft_type}" for spec in adapters)
        raise ValueError(f"all runs must use the same PEFT method to share one base model, got {listing}")
    return specs
