"""What the three RF trainers share while they are built: argument coercion, the runs' specs and the one model
carrying their adapters (`runs_on_one_model`: parsing, checks, loading the model once, each run's adapter, a
user-built `PeftModel` included), and data-set checks."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from datasets import Dataset, IterableDataset
from peft import PeftModel
from transformers import PreTrainedModel, TrainingArguments
from trl.trainer.utils import create_model_from_path

from ..adapters import attach_adapters, remove_adapters
from ..configs import RunSpec, describe_config, parse_configs

logger = logging.getLogger(__name__)


def runs_on_one_model(
    model: str | PreTrainedModel,
    args: TrainingArguments,
    configs: Sequence[dict[str, Any]] | None,
    peft_config: Any,
    per_run_fields: frozenset[str],
    *,
    optimizers: tuple,
    quantization_config: Any,
    datasets: tuple[Any, Any],
    check_specs: Callable[[list[RunSpec]], None],
    check_dataset: Callable[[Any, str], None],
    run_args: TrainingArguments | None = None,
    train_required: str = "`train_dataset` is required",
) -> tuple[list[RunSpec], torch.nn.Module, bool]:
    """The runs' specs and the model carrying their adapters, checked in the order every trainer refuses things: the
    specs (parsed from `run_args`, defaulting to `args`; the trainer's `check_specs`; what runs cannot share), then
    the data sets (`check_dataset(data, name)`), and only then the model, loaded once, each run's adapter added.
    Also returns whether the model was a `PeftModel` the user built (referenced as TRL references it)."""
    runs_dir = Path(args.output_dir) / "runs"
    user_peft = isinstance(model, PeftModel)
    specs = parse_configs(
        configs, run_args or args, peft_config, per_run_fields, lambda name: runs_dir / name, user_peft
    )
    check_specs(specs)
    validate_setup(specs, args, optimizers)
    train_dataset, eval_dataset = datasets
    if train_dataset is None:
        raise ValueError(train_required)
    check_dataset(train_dataset, "train_dataset")
    check_dataset(eval_dataset, "eval_dataset")
    loaded = load_model(model, args, quantization_config)
    return specs, attach_run_adapters(loaded, specs, peft_config), user_peft


def validate_setup(specs: list[RunSpec], args: TrainingArguments, optimizers: tuple) -> None:
    """Refuse what several runs cannot share (the options themselves are checked by `RFArgs`)."""
    if len(specs) > 1 and any(item is not None for item in optimizers):
        raise ValueError(
            "optimizers=(optimizer, scheduler) holds one optimizer, but each of the "
            f"{len(specs)} runs needs its own; use optimizer_cls_and_kwargs=(cls, kwargs) or per-run 'optim' instead"
        )
    if len(specs) > 1 and args.load_best_model_at_end:
        raise ValueError("load_best_model_at_end=True is not supported with several runs; compare runs with results()")


def refuse_fused(fused: bool, trainer: str) -> None:
    if fused:
        raise ValueError(
            f"fused=True is not supported by {trainer} yet (its steps need generated batches); RFSFTTrainer and "
            "RFDPOTrainer fuse runs. Use fused=False: runs rotate at chunk boundaries"
        )


def coerce_args(model: Any, args: TrainingArguments | None, config_class: type, suffix: str) -> TrainingArguments:
    """As TRL does: `<model name>-<suffix>` as output dir when `args` is None; `TrainingArguments` converted."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return config_class(f"{model_name.split('/')[-1]}-{suffix}")
    if isinstance(args, config_class):
        return args
    as_dict = args.to_dict()
    as_dict["hub_token"] = args.hub_token
    return config_class(**as_dict)


_Init = TypeVar("_Init", bound=Callable[..., None])  # keeps each trainer's __init__ signature for type checkers


def checked_model(init: _Init) -> _Init:
    """Refuse a `model` that is neither a hub id / path nor a model, and make a trainer that refuses to build (bad
    `num_chunks`, data...) leave the caller's model as it was: PEFT injects the runs' LoRA layers into it in place,
    and the user fixing the value and retrying must not find them there."""

    @functools.wraps(init)
    def wrapped(self, model, *args, **kwargs) -> None:
        if not isinstance(model, (str, torch.nn.Module)):
            raise ValueError(
                f"model must be a hub id, a local path or a transformers model, got {type(model).__name__}"
            )
        injected = isinstance(model, PreTrainedModel) and not hasattr(model, "peft_config")
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()} if injected else {}
        own = (set(model.peft_config), model.active_adapter) if isinstance(model, PeftModel) else None
        try:
            init(self, model, *args, **kwargs)
        except BaseException:
            if injected:
                remove_adapters(model, requires_grad)
            elif own is not None:  # a PeftModel the user built: drop the runs' adapters added beside its own
                for name in set(model.peft_config) - own[0]:
                    model.delete_adapter(name)
                model.set_adapter(own[1])
            raise

    return cast(_Init, wrapped)


PEFT_MODEL_AND_CONFIG = (  # TRL's words, for the same mistake
    "You passed a `PeftModel` instance together with a `peft_config` to the trainer. Please first merge and unload "
    "the existing adapter, save the resulting base model, and then pass that base model along with the new "
    "`peft_config` to the trainer."
)


def attach_run_adapters(model: PreTrainedModel | PeftModel, specs: list[RunSpec], peft_config: Any) -> torch.nn.Module:
    """Give every run its adapter on the one base model. A `PeftModel` the user built keeps its active adapter, which
    the one run without a `peft_config` trains (any PEFT method); the other runs' adapters are added beside it, which
    PEFT allows only for the same method."""
    if not isinstance(model, PeftModel):
        return attach_adapters(model, specs) if any(spec.peft_config is not None for spec in specs) else model
    if peft_config is not None:
        raise ValueError(PEFT_MODEL_AND_CONFIG)
    own = [spec for spec in specs if spec.peft_config is None]
    adapter = model.active_adapter
    if len(own) > 1:
        raise ValueError(
            f"model is a PeftModel, whose adapter {adapter!r} one run can train, but runs "
            f"{[spec.name for spec in own]} have no peft_config; give all runs but one their own peft_config"
        )
    if not own:
        logger.warning(
            "model is a PeftModel, but every config brings its own peft_config, so no run trains its adapter %r: it "
            "stays in the model, inactive (leave peft_config out of one config to train it as that run)",
            adapter,
        )
    else:
        own[0].own_adapter = adapter
        own[0].peft_config = model.peft_config[adapter]
        own[0].summary = describe_config(own[0].peft_config, own[0].overrides)
    added = [spec for spec in specs if spec.own_adapter is None]
    for spec in added:
        if spec.peft_config.peft_type != model.peft_type:
            raise ValueError(
                f"run {spec.name!r}: its peft_config is {spec.peft_config.peft_type}, but the model is a PeftModel "
                f"with a {model.peft_type} adapter ({adapter!r}); PEFT cannot hold adapters of different methods on "
                "one model, so every run must use the model's method (or pass the base model instead)"
            )
    if added:
        attach_adapters(model, added)
        model.set_adapter(adapter)
    return model


def load_model(model: str | PreTrainedModel, args: TrainingArguments, quantization_config) -> PreTrainedModel:
    """Load a hub id or local path once, with the same keyword arguments `SFTTrainer` would use."""
    if not isinstance(model, str):
        return model
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(model, **kwargs)


def named_datasets(dataset: Any, name: str) -> list[tuple[str, Dataset | IterableDataset]]:
    """The `(name, data set)` pairs whose columns can be checked, refusing what is not a data set or is empty (a
    stream whose columns are unknown until read is left to TRL)."""
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        return [pair for key, value in dataset.items() for pair in named_datasets(value, f"{name}[{key!r}]")]
    if isinstance(dataset, IterableDataset):
        return [(name, dataset)] if dataset.column_names is not None else []
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"{name} must be a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    return [(name, dataset)]
