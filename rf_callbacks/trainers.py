"""The public trainers: TRL's trainers with `MultiConfigMixin` in front.

`RFSFTTrainer` takes everything `trl.SFTTrainer` takes, plus `configs` (the runs to compare), `num_chunks` and
`offload_optimizer`. With no `configs` and no engine option, each is exactly its TRL parent (`dropin.py`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from datasets import Dataset, IterableDataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, TrainingArguments
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import create_model_from_path

from .adapters import attach_adapters, remove_adapters
from .chunks import check_num_chunks
from .configs import TRAINING_PER_RUN_FIELDS, RunSpec, describe_config, parse_configs
from .dropin import drop_in
from .mixin import RUN_ATTRIBUTES, MultiConfigMixin
from .oom import init_oom_retry
from .streams import is_stream

logger = logging.getLogger(__name__)

SFT_PER_RUN_FIELDS = TRAINING_PER_RUN_FIELDS | {
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "loss_type",
}


def _validate_setup(
    specs: list[RunSpec],
    args: TrainingArguments,
    num_chunks: Any,
    optimizers: tuple,
    offload_optimizer: Any,
    oom_retry: Any = False,
) -> None:
    if offload_optimizer not in (True, False, "auto"):
        raise ValueError(f"offload_optimizer={offload_optimizer!r} is invalid; use True, False or 'auto'")
    if not isinstance(oom_retry, bool):
        raise ValueError(f"oom_retry={oom_retry!r} is invalid; use True or False")
    check_num_chunks(num_chunks)
    if len(specs) > 1 and any(item is not None for item in optimizers):
        raise ValueError(
            "optimizers=(optimizer, scheduler) holds one optimizer, but each of the "
            f"{len(specs)} runs needs its own; use optimizer_cls_and_kwargs=(cls, kwargs) or per-run 'optim' instead"
        )
    if len(specs) > 1 and args.load_best_model_at_end:
        raise ValueError("load_best_model_at_end=True is not supported with several runs; compare runs with results()")


def _validate_sft_specs(specs: list[RunSpec], compute_loss_func: Callable | None = None) -> None:
    """Refuse, before any work, per-run SFT values that `SFTTrainer` would refuse only while preparing or training."""
    for index, spec in enumerate(specs):
        where, args = f"configs[{index}] ({spec.name!r})", spec.args
        if args.loss_type not in ("nll", "dft"):
            raise ValueError(f"{where}: loss_type={args.loss_type!r} is invalid; use 'nll' or 'dft'")
        if args.loss_type == "dft" and compute_loss_func is not None:
            raise ValueError(f"{where}: loss_type='dft' cannot be combined with compute_loss_func")
        if args.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"{where}: truncation_mode={args.truncation_mode!r} is invalid; use 'keep_start' or 'keep_end'"
            )


def _refuse_fused(fused: bool, trainer: str) -> None:
    if fused:
        raise ValueError(
            f"fused=True is not supported by {trainer} yet (its steps need generated batches); RFSFTTrainer and "
            "RFDPOTrainer fuse runs. Use fused=False: runs rotate at chunk boundaries"
        )


def _coerce_args(model: Any, args: TrainingArguments | None, config_class: type, suffix: str) -> TrainingArguments:
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


def _checked_model(init: _Init) -> _Init:
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


_PEFT_MODEL_AND_CONFIG = (  # TRL's words, for the same mistake
    "You passed a `PeftModel` instance together with a `peft_config` to the trainer. Please first merge and unload "
    "the existing adapter, save the resulting base model, and then pass that base model along with the new "
    "`peft_config` to the trainer."
)


def _attach_run_adapters(
    model: PreTrainedModel | PeftModel, specs: list[RunSpec], peft_config: Any
) -> torch.nn.Module:
    """Give every run its adapter on the one base model. A `PeftModel` the user built keeps its active adapter, which
    the one run without a `peft_config` trains (any PEFT method); the other runs' adapters are added beside it, which
    PEFT allows only for the same method."""
    if not isinstance(model, PeftModel):
        return attach_adapters(model, specs) if any(spec.peft_config is not None for spec in specs) else model
    if peft_config is not None:
        raise ValueError(_PEFT_MODEL_AND_CONFIG)
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


def _load_model(model: str | PreTrainedModel, args: TrainingArguments, quantization_config) -> PreTrainedModel:
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


def _datasets(dataset: Any, name: str) -> list[tuple[str, Dataset | IterableDataset]]:
    """The `(name, data set)` pairs whose columns can be checked, refusing what is not a data set or is empty (a
    stream whose columns are unknown until read is left to TRL)."""
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        return [pair for key, value in dataset.items() for pair in _datasets(value, f"{name}[{key!r}]")]
    if isinstance(dataset, IterableDataset):
        return [(name, dataset)] if dataset.column_names is not None else []
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"{name} must be a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    return [(name, dataset)]


def _check_sft_dataset(dataset: Any, name: str, args: SFTConfig, formatting_func: Callable | None) -> None:
    """Refuse, before any work, a data set `SFTTrainer` could only fail on later (or one without a length)."""
    for label, data in _datasets(dataset, name):
        if formatting_func is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            continue
        columns = set(data.column_names)
        accepted = [{args.dataset_text_field}, {"messages"}, {"conversations"}, {"prompt", "completion"}]
        accepted.append({"input_ids"})
        if not any(needed <= columns for needed in accepted):
            wanted = ", ".join("+".join(sorted(needed)) for needed in accepted)
            raise ValueError(
                f"{label} has columns {sorted(columns)}, but SFT needs one of: {wanted} (or pass formatting_func=)"
            )


@drop_in
class RFSFTTrainer(MultiConfigMixin, SFTTrainer):
    """Supervised fine-tuning of several LoRA configs at once on one resident base model.

    Takes every argument of [`~trl.SFTTrainer`] with the same meaning, plus:

    Args:
        configs (`list[dict]`, *optional*):
            The runs to compare. Each dict may hold `name` (defaults to `run-<i>`, 1-based), `peft_config` (defaults
            to the trainer's `peft_config`) and overrides of per-run [`~trl.SFTConfig`] fields: learning_rate,
            lr_scheduler_type, lr_scheduler_kwargs, warmup_ratio/warmup_steps, weight_decay, max_grad_norm, optim,
            optim_args, adam_beta1/2, adam_epsilon, max_steps, num_train_epochs, per_device_train_batch_size,
            per_device_eval_batch_size, gradient_accumulation_steps, seed, logging/eval/save strategy and steps,
            max_length, truncation_mode, completion_only_loss, assistant_only_loss, loss_type. When `None` (and no
            other engine option is set) the trainer is exactly `SFTTrainer`: see `rf_callbacks.dropin`.
            `configs=[{}]` trains one run from `peft_config` and `args` through the engine.
        num_chunks (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            Chunks per epoch. Runs rotate at chunk boundaries, where each run is also evaluated. `"auto"`: 4, or
            fewer when a run has fewer optimizer steps per epoch (the choice is logged). An explicit number that a run
            cannot fit is refused.
        offload_optimizer (`bool` or `"auto"`, *optional*, defaults to `True`):
            On a CUDA machine, park a waiting run's optimizer state in pinned host memory (`True`), keep it on the
            device (`False`), or keep it on the device while at least 10% of the GPU stays free (`"auto"`). Ignored
            on CPU-only torch, where nothing moves.
        control_socket (`bool`, *optional*, defaults to `True`):
            While `train()` runs, answer IC ops (stop, resume, delete, clone, ls, status, metrics) on the Unix socket
            `<output_dir>/control.sock` (mode 0600), which the `rf-callbacks` CLI and the dashboard use.
        dashboard (`bool`, *optional*, defaults to `False`):
            While `train()` runs, serve the local web dashboard on 127.0.0.1 and print its URL (with its secret
            token), as `rf-callbacks dashboard --dir <output_dir>` does from another shell.
        policies (`list[Policy]`, *optional*):
            Automatic decisions at chunk boundaries (`rf_callbacks.policies`: `SuccessiveHalving`,
            `MedianStopping`, `DivergenceGuard`, `Explore`, or any object with `on_boundary(view) -> list[Op]`).
            They act through IC ops, recorded with their reasons.
        boundary_eval (`bool`, *optional*, defaults to `True`):
            Evaluate each run at every chunk boundary it reaches. With `False`, a run is evaluated only where a
            policy needs it (e.g. `SuccessiveHalving`'s rungs), at its end, and where `eval_strategy` says: a large
            saving when chunks are short and the eval set is not.
        checkpoint_every (`int`, *optional*):
            Boundaries between two experiment checkpoints in `<output_dir>/checkpoints` (default 1: every boundary,
            plus one when training ends); `save_strategy="no"` turns them off, `save_total_limit` (default 2) says
            how many are kept. `train(resume_from_checkpoint=True)` continues from the newest one, bit-for-bit.
        fused (`bool`, *optional*, defaults to `False`):
            Train runs at the same chunk together: their micro-batches are concatenated, the frozen base runs once
            per micro-batch round and each LoRA layer applies each run's adapter to that run's rows; one backward,
            then each run's own optimizer step. Runs keep their own batch size, gradient accumulation, optimizer and
            schedule; results match rotation up to floating-point summation order (max abs diff <= 1e-4). Runs
            whose adapter is not plain LoRA on linear layers (DoRA, embeddings, `modules_to_save`) rotate as usual.
        max_fused (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            Most runs in one fused group. `"auto"`: as many as the free memory holds (CUDA: the device's free memory
            and the peak allocated per batch row in earlier rounds; CPU: the host's available memory and twice the
            activation bytes autograd saved per row), 4 until measured, 8 where the free memory cannot be read.
        oom_retry (`bool`, *optional*, defaults to `False`):
            When a run's step runs out of memory (`torch.OutOfMemoryError`) in its forward or backward pass, free its
            gradients and the CUDA cache and go on from that optimizer step with `per_device_train_batch_size` halved
            and `gradient_accumulation_steps` doubled: the same rows per optimizer step, data order, step count and
            LR schedule (not bit-for-bit what the larger micro-batch would give: padding, summation order and dropout
            masks differ). Once per run; a second out-of-memory error, an odd micro-batch, or one in the optimizer
            step or in an evaluation fails the run with the reason. Recorded in the ledger (`oom_retry` event),
            `results()` and `run.json`. With `False`, an out-of-memory error fails the run like any other error.
            With `fused=True` it applies to runs trained alone; a fused group that runs out of memory is retried run
            by run by the fused round itself, and a run whose own micro-batch still does not fit fails.
        parallel (`str`, *optional*, defaults to `"auto"`):
            Under `accelerate launch --num_processes N` (ignored in one process). `"configs"`: each run trains on one
            process at a time, runs spread over the processes and may move between them at boundaries; a run ends
            bit-for-bit as in one process. `"data"`: all processes train the same run at once (its global batch is
            `per_device_train_batch_size` x N), rotating runs together. `"auto"`: `"configs"` when there are at
            least N runs, else `"data"`. See the README's "Several GPUs".

    Usage:
    ```python
    from peft import LoraConfig
    from trl import SFTConfig
    from rf_callbacks import RFSFTTrainer

    trainer = RFSFTTrainer(
        model=model,
        args=SFTConfig(output_dir="out", max_steps=200, learning_rate=1e-4),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        configs=[
            {"name": "r8-hi", "peft_config": LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
             "learning_rate": 1e-3},
            {"peft_config": LoraConfig(r=32, target_modules="all-linear"), "per_device_train_batch_size": 2},
        ],
        num_chunks=8,
    )
    trainer.train()
    for row in trainer.results():
        print(row["name"], row["status"], row["global_step"], row["train_loss"], row["eval_loss"])
    ```
    """

    per_run_fields = SFT_PER_RUN_FIELDS
    run_attributes = RUN_ATTRIBUTES + ("_metrics", "_total_train_tokens")

    @_checked_model
    def __init__(
        self,
        model: str | PreTrainedModel,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config=None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable | None = None,
        *,
        configs: Sequence[dict[str, Any]] | None = None,
        num_chunks: int | str = "auto",
        offload_optimizer: bool | str = True,
        control_socket: bool = True,
        dashboard: bool = False,
        policies: list | None = None,
        boundary_eval: bool = True,
        checkpoint_every: int | None = None,
        fused: bool = False,
        max_fused: int | str = "auto",
        oom_retry: bool = False,
        parallel: str = "auto",
    ):
        args = _coerce_args(model, args, SFTConfig, "SFT")
        runs_dir = Path(args.output_dir) / "runs"
        specs = parse_configs(
            configs, args, peft_config, self.per_run_fields, lambda name: runs_dir / name, isinstance(model, PeftModel)
        )
        _validate_sft_specs(specs, compute_loss_func)
        _validate_setup(specs, args, num_chunks, optimizers, offload_optimizer, oom_retry)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        _check_sft_dataset(train_dataset, "train_dataset", args, formatting_func)
        _check_sft_dataset(eval_dataset, "eval_dataset", args, formatting_func)
        model = _load_model(model, args, quantization_config)
        model = _attach_run_adapters(model, specs, peft_config)
        self._rf_raw = {"train": train_dataset, "eval": eval_dataset, "formatting_func": formatting_func}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            formatting_func=formatting_func,
        )
        if fused:
            self._check_fused(max_fused)
        self._build_runs(
            specs,
            num_chunks,
            offload_optimizer,
            control_socket,
            dashboard,
            policies,
            boundary_eval,
            checkpoint_every,
            fused,
            max_fused,
            parallel,
        )
        init_oom_retry(self, oom_retry)

    def _check_run_spec(self, spec: RunSpec) -> None:
        _validate_sft_specs([spec], self.compute_loss_func)

    # Per-run data: `max_length`, `truncation_mode`, `completion_only_loss` and `assistant_only_loss` are applied when
    # `SFTTrainer` prepares (tokenizes, masks, truncates) the data, so runs that differ in them get their own copy.
    def _data_key(self, args) -> tuple:
        return (args.max_length, args.truncation_mode, args.completion_only_loss, args.assistant_only_loss)

    def _prepare_run_datasets(self, args, key: tuple) -> tuple[Any, Any]:
        if key == self._data_key(self._rf_shared_args) or self._skip_prepare_dataset:
            return self.train_dataset, self.eval_dataset
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        raw_train, raw_eval = self._rf_raw["train"], self._rf_raw["eval"]
        sample = next(iter(raw_train))
        if args.assistant_only_loss and not is_conversational(sample):
            raise ValueError(
                f"run with output_dir {args.output_dir}: assistant_only_loss=True needs a conversational data set"
            )
        saved = (self.args, self.completion_only_loss, self.chat_template)
        self.args = args
        if args.completion_only_loss is None:
            self.completion_only_loss = "prompt" in sample and "completion" in sample
        else:
            self.completion_only_loss = args.completion_only_loss
        template = self.processing_class.chat_template
        needs_markers = args.assistant_only_loss and not has_generation_markers(template)
        self.chat_template = get_training_chat_template(self.processing_class) if needs_markers else None
        try:
            prepare = self._prepare_dataset
            formatting_func = self._rf_raw["formatting_func"]
            train = prepare(raw_train, self.processing_class, args, args.packing, formatting_func, "train")
            packing = args.packing if args.eval_packing is None else args.eval_packing
            if isinstance(raw_eval, dict):
                evals = {
                    name: prepare(data, self.processing_class, args, packing, formatting_func, name)
                    for name, data in raw_eval.items()
                }
            elif raw_eval is not None:
                evals = prepare(raw_eval, self.processing_class, args, packing, formatting_func, "eval")
            else:
                evals = None
        finally:
            self.args, self.completion_only_loss, self.chat_template = saved
        return train, evals

    def _init_trainer_run_state(self, run) -> None:
        from collections import defaultdict

        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0


DPO_PER_RUN_FIELDS = TRAINING_PER_RUN_FIELDS | {
    "max_length",
    "truncation_mode",
    "pad_to_multiple_of",
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "discopop_tau",
}

# `DPOTrainer.__init__` copies these from `args` into attributes its loss reads; each run has its own.
_DPO_LOSS_ATTRIBUTES = (
    "beta",
    "loss_types",
    "loss_weights",
    "label_smoothing",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
)


def _check_preference_dataset(dataset: Any, name: str) -> None:
    """Refuse, before any work, a data set `DPOTrainer` could only fail on later (or one without a length)."""
    for label, data in _datasets(dataset, name):
        columns = set(data.column_names)
        if not {"chosen", "rejected"} <= columns:
            raise ValueError(
                f"{label} has columns {sorted(columns)}, but DPO needs chosen+rejected (and usually prompt): a "
                "preference data set in TRL's standard or conversational format"
            )


@drop_in
class RFDPOTrainer(MultiConfigMixin, DPOTrainer):
    """Direct preference optimisation of several LoRA configs at once on one resident base model.

    Takes every argument of [`~trl.DPOTrainer`] with the same meaning, plus the rf-callbacks ones (`configs`,
    `num_chunks`, `policies`, `checkpoint_every`, `fused`, `oom_retry`, ...) as [`RFSFTTrainer`] takes them. Per-run
    fields are those of `RFSFTTrainer` (optimisation, schedule, batch size, steps, logging/eval/save) plus the DPO
    ones: beta, loss_type, loss_weights, label_smoothing, ld_alpha, f_divergence_type, f_alpha_divergence_coef,
    discopop_tau, max_length, truncation_mode, pad_to_multiple_of.

    The reference model is the shared base with adapters disabled (every run starts from a fresh adapter, whose model
    equals the base): no reference copy of the model, and no frozen "ref" adapter, per run. With `ref_model` (a model
    or a hub id / local path) one reference model serves all runs.

    With `fused=True`, the policy forward and backward of a group of runs is one pass over their concatenated
    [chosen; rejected] micro-batches (see [`RFSFTTrainer`]); each run's reference pass stays its own (no gradient).

    Usage:
    ```python
    trainer = RFDPOTrainer(
        model=model,
        args=DPOConfig(output_dir="out", max_steps=100, learning_rate=5e-4),
        train_dataset=prefs,
        processing_class=tokenizer,
        configs=[
            {"peft_config": LoraConfig(r=8, target_modules="all-linear"), "beta": 0.1},
            {"peft_config": LoraConfig(r=16, target_modules="all-linear"), "beta": 0.5,
             "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        ],
        num_chunks=4,
    )
    trainer.train()
    ```
    """

    per_run_fields = DPO_PER_RUN_FIELDS
    run_attributes = RUN_ATTRIBUTES + ("_metrics", "_total_train_tokens", "data_collator") + _DPO_LOSS_ATTRIBUTES
    result_metrics = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    @_checked_model
    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: DPOConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config=None,
        peft_config: PeftConfig | None = None,
        *,
        configs: Sequence[dict[str, Any]] | None = None,
        num_chunks: int | str = "auto",
        offload_optimizer: bool | str = True,
        control_socket: bool = True,
        dashboard: bool = False,
        policies: list | None = None,
        boundary_eval: bool = True,
        checkpoint_every: int | None = None,
        fused: bool = False,
        max_fused: int | str = "auto",
        oom_retry: bool = False,
    ):
        from .preference import DPO_PROCESS_WIDE_REASONS, no_ref_adapter_copy, refuse_ref_name, validate_dpo_specs

        args = _coerce_args(model, args, DPOConfig, "DPO")
        for index, config in enumerate(configs or []):
            for key in config if isinstance(config, dict) else ():
                if key in DPO_PROCESS_WIDE_REASONS:
                    name = config.get("name", f"run-{index + 1}")
                    raise ValueError(
                        f"configs[{index}] ({name!r}): {key}={config[key]!r} cannot differ per run in one process "
                        f"({DPO_PROCESS_WIDE_REASONS[key]}); set it in args instead"
                    )
        runs_dir = Path(args.output_dir) / "runs"
        specs = parse_configs(
            configs, args, peft_config, self.per_run_fields, lambda name: runs_dir / name, isinstance(model, PeftModel)
        )
        validate_dpo_specs(specs)
        refuse_ref_name(specs)
        _validate_setup(specs, args, num_chunks, optimizers, offload_optimizer, oom_retry)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        _check_preference_dataset(train_dataset, "train_dataset")
        _check_preference_dataset(eval_dataset, "eval_dataset")
        model = _load_model(model, args, quantization_config)
        if ref_model is not None:
            ref_model = _load_model(ref_model, args, quantization_config)
        guard = contextlib.nullcontext()
        # A PeftModel the user built is referenced as TRL references it (a frozen copy of its adapter); runs' fresh
        # adapters on a plain model are referenced by the shared base, adapters disabled.
        user_peft = isinstance(model, PeftModel)
        model = _attach_run_adapters(model, specs, peft_config)
        if isinstance(model, PeftModel) and not user_peft and ref_model is None:
            guard = no_ref_adapter_copy(model)
        self._rf_raw = {"train": train_dataset, "eval": eval_dataset}
        self._rf_user_collator = data_collator is not None
        with guard:
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
            )
        if fused:
            self._check_fused(max_fused)
        self._build_runs(
            specs,
            num_chunks,
            offload_optimizer,
            control_socket,
            dashboard,
            policies,
            boundary_eval,
            checkpoint_every,
            fused,
            max_fused,
        )
        init_oom_retry(self, oom_retry)

    def results(self) -> list[dict[str, Any]]:
        """`RFSFTTrainer.results()` plus the last logged DPO reward metrics (train and eval) of each run."""
        rows = []
        for run, row in zip(self.coordinator, super().results()):
            for key in self.result_metrics:
                for logged in (key, f"eval_{key}"):
                    value = run.last_logged(logged)
                    if value is not None:
                        row[logged] = value
            rows.append(row)
        return rows

    def _check_run_spec(self, spec: RunSpec) -> None:
        from .preference import validate_dpo_specs

        validate_dpo_specs([spec])

    # Per-run data: `max_length` and `truncation_mode` decide which rows `DPOTrainer._prepare_dataset` keeps (with
    # `keep_start`, rows whose prompt fills `max_length` are dropped), so runs that differ in them get their own copy.
    def _data_key(self, args) -> tuple:
        return (args.max_length, args.truncation_mode)

    def _fused_model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The policy forward's arguments as `DPOTrainer._compute_loss` builds them: completion tokens as labels."""
        dropped = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        kwargs = {key: value for key, value in inputs.items() if key not in dropped}
        return {**kwargs, "labels": inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)}

    def _preference_collator(self, args):
        if self._rf_user_collator or self._is_vision_dataset:
            return self.data_collator
        return DataCollatorForPreference(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )

    def _prepare_run_datasets(self, args, key: tuple) -> tuple[Any, Any]:
        if key == self._data_key(self._rf_shared_args) or self._is_vision_dataset:
            return self.train_dataset, self.eval_dataset
        raw_train, raw_eval = self._rf_raw["train"], self._rf_raw["eval"]
        saved = (self.args, self.data_collator)
        self.args, self.data_collator = args, self._preference_collator(args)
        try:
            train = self._prepare_dataset(raw_train, self.processing_class, args, "train")
            if isinstance(raw_eval, dict):
                evals = {name: self._prepare_dataset(data, self.processing_class, args, name) for name, data in
                         raw_eval.items()}  # fmt: skip
            elif raw_eval is not None:
                evals = self._prepare_dataset(raw_eval, self.processing_class, args, "eval")
            else:
                evals = None
            if args.precompute_ref_log_probs:  # from the shared reference: the base, or the given ref_model
                train_bs = args.precompute_ref_batch_size or args.per_device_train_batch_size
                eval_bs = args.precompute_ref_batch_size or args.per_device_eval_batch_size
                train = self._precompute_ref_logps(train, "train", train_bs)
                if isinstance(evals, dict):
                    evals = {name: self._precompute_ref_logps(data, name, eval_bs) for name, data in evals.items()}
                elif evals is not None:
                    evals = self._precompute_ref_logps(evals, "eval", eval_bs)
        finally:
            self.args, self.data_collator = saved
        return train, evals

    def _init_trainer_run_state(self, run) -> None:
        from collections import defaultdict

        args = self.args  # the run's own arguments, set by `_init_run_state`
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self.beta = args.beta
        self.loss_types = args.loss_type
        self.loss_weights = args.loss_weights or [1.0] * len(self.loss_types)
        self.label_smoothing = args.label_smoothing
        self.ld_alpha = args.ld_alpha
        self.f_divergence_type = args.f_divergence_type
        self.f_alpha_divergence_coef = args.f_alpha_divergence_coef
        self.data_collator = self._preference_collator(args)


GRPO_PER_RUN_FIELDS = TRAINING_PER_RUN_FIELDS | {
    "num_generations",
    "num_generations_eval",
    "max_completion_length",
    "steps_per_generation",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_kwargs",
    "beta",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "reward_weights",
    "scale_rewards",
    "loss_type",
    "mask_truncated_completions",
    "top_entropy_quantile",
    "entropy_coef",
    "log_completions",
    "num_completions_to_print",
}

# `GRPOTrainer.__init__` copies these from `args` into attributes its generation and loss read; each run has its own,
# as it has its own generation buffer (`_buffered_inputs`, reused for `steps_per_generation` x `num_iterations`
# micro-steps), its micro-step counter `_step` (which decides when to generate again), and its metric buffers.
_GRPO_RUN_ATTRIBUTES = (
    "_metrics",
    "_total_train_tokens",
    "_current_train_step_time",
    "_step",
    "_buffered_inputs",
    "_logs",
    "num_generations",
    "num_generations_eval",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "generation_config",
    "generation_kwargs",
    "beta",
    "num_iterations",
    "epsilon_low",
    "epsilon_high",
    "importance_sampling_level",
    "reward_weights",
    "scale_rewards",
    "loss_type",
    "mask_truncated_completions",
    "top_entropy_quantile",
    "entropy_coef",
    "_entropy_bonus_enabled",
    "_last_world_entropy",
    "_entropy_window_stats",
    "log_completions",
    "num_completions_to_print",
)


def _grpo_epoch_order(
    num_prompts: int, epoch: int, seed: int, shuffle: bool, prompts_per_batch: int, repeats: int, generations: int
) -> tuple[int, ...]:
    """The rows `trl.trainer.utils.RepeatSampler` yields in `epoch`: a permutation drawn from one generator seeded
    once (so epoch e is its (e+1)-th draw), cut into groups of `prompts_per_batch` prompts (a short last group is
    dropped), each group repeated `repeats` times, each prompt `generations` times in a row."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epoch + 1):
            indexes = torch.randperm(num_prompts, generator=generator).tolist()
    else:
        indexes = list(range(num_prompts))
    order = []
    for start in range(0, num_prompts - prompts_per_batch + 1, prompts_per_batch):
        group = indexes[start : start + prompts_per_batch]
        for _ in range(repeats):
            for index in group:
                order.extend([index] * generations)
    return tuple(order)


def _stash(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One value of a GRPO run's checkpointed state: a tensor goes to `tensors` (a CPU copy), a list of them item by
    item (e.g. per-image pixel values), anything else must be JSON."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value):
        return {"list": [_stash(item, f"{key}.{j}", tensors) for j, item in enumerate(value)]}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"RFGRPOTrainer cannot write {key} ({type(value).__name__}) into an experiment checkpoint; turn "
            "checkpoints off with save_strategy='no'"
        ) from None
    return {"value": value}


def _unstash(record: dict[str, Any], tensors: dict[str, torch.Tensor], device) -> Any:
    if "list" in record:
        return [_unstash(item, tensors, device) for item in record["list"]]
    return tensors[record["tensor"]].to(device) if "tensor" in record else record["value"]


def _check_prompt_dataset(dataset: Any, name: str) -> None:
    """Refuse, before any work, a data set `GRPOTrainer` could only fail on later (or one without a length)."""
    for label, data in _datasets(dataset, name):
        if "prompt" not in data.column_names:
            raise ValueError(f"{label} has columns {sorted(data.column_names)}, but GRPO needs a 'prompt' column")


@drop_in
class RFGRPOTrainer(MultiConfigMixin, GRPOTrainer):
    """Group relative policy optimisation of several LoRA configs at once on one resident base model.

    Takes every argument of [`~trl.GRPOTrainer`] with the same meaning (reward functions are shared by all runs), plus
    the rf-callbacks ones (`configs`, `num_chunks`, `policies`, `checkpoint_every`, ...; not `oom_retry=True` yet)
    as [`RFSFTTrainer`] takes them. Per-run fields are those of `RFSFTTrainer` plus the GRPO ones:
    num_generations, max_completion_length, steps_per_generation (or generation_batch_size), temperature, top_p,
    top_k, min_p, repetition_penalty, generation_kwargs, beta, num_iterations, epsilon, epsilon_high, delta,
    importance_sampling_level, reward_weights, scale_rewards, loss_type, mask_truncated_completions,
    top_entropy_quantile, entropy_coef. Each run's generation batch must be divisible by its num_generations
    (checked before any work).

    Completions are generated with the active run's adapter. Each run keeps its own generation buffer (reused for
    `steps_per_generation` x `num_iterations` micro-steps) and its own metrics; they are parked with the run at a
    chunk boundary, and written with it into experiment checkpoints (the buffered generations as tensors, the
    micro-step counter that decides when to generate again, the adaptive entropy state), so a resumed GRPO experiment
    ends bit-for-bit where it would have ended. The reference model (for `beta` > 0) is the shared base with adapters
    disabled.
    """

    per_run_fields = GRPO_PER_RUN_FIELDS
    run_attributes = RUN_ATTRIBUTES + _GRPO_RUN_ATTRIBUTES
    result_metrics = ("reward", "reward_std", "completions/mean_length", "kl")

    @_checked_model
    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs=None,
        args: GRPOConfig | TrainingArguments | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config=None,
        peft_config: PeftConfig | None = None,
        tools: list[Callable] | None = None,
        rollout_func: Callable | None = None,
        environment_factory: Callable | dict[str, Callable] | None = None,
        *,
        configs: Sequence[dict[str, Any]] | None = None,
        num_chunks: int | str = "auto",
        offload_optimizer: bool | str = True,
        control_socket: bool = True,
        dashboard: bool = False,
        policies: list | None = None,
        boundary_eval: bool = True,
        checkpoint_every: int | None = None,
        fused: bool = False,
        oom_retry: bool = False,
    ):
        _refuse_fused(fused, "RFGRPOTrainer")
        plain_only = {"tools": tools, "rollout_func": rollout_func, "environment_factory": environment_factory}
        for name, value in plain_only.items():
            if value is not None:
                raise ValueError(
                    f"{name}= is supported by RFGRPOTrainer only as a plain GRPOTrainer (no configs): the engine "
                    "rotates runs over one generation loop that does not drive tools, custom rollouts or environments"
                )
        import copy

        from .preference import GRPO_PROCESS_WIDE_REASONS, no_ref_adapter_copy, refuse_ref_name, validate_grpo_specs

        if oom_retry is not False:
            raise ValueError(
                f"oom_retry={oom_retry!r}: RFGRPOTrainer cannot retry a step that ran out of memory yet (a smaller "
                "micro-batch changes its generation batch and the generation buffer it reuses across steps)"
            )
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOConfig(f"{model_name.split('/')[-1]}-GRPO")
        elif not isinstance(args, GRPOConfig):
            raise ValueError(f"args must be a trl.GRPOConfig, got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError("reward_funcs is required: one reward function (or model id), or a list of them")
        num_rewards = len(reward_funcs) if isinstance(reward_funcs, list) else 1
        # Run arguments are the shared ones with overrides applied, and `GRPOConfig.__post_init__` derives the
        # generation batch from the batch size and `steps_per_generation` (by default the gradient accumulation): start
        # each run from the shared values before that derivation, so a run's own batch size or gradient accumulation
        # give it the generation batch plain `GRPOConfig` would give them.
        template = copy.copy(args)
        template.generation_batch_size = None
        if args.steps_per_generation == args.gradient_accumulation_steps:
            template.steps_per_generation = None
        run_configs = None
        if configs is not None and isinstance(configs, (list, tuple)):
            run_configs = []
            for index, config in enumerate(configs):
                if not isinstance(config, dict):
                    run_configs.append(config)
                    continue
                name = config.get("name", f"run-{index + 1}")
                where = f"configs[{index}] ({name!r})"
                for key in config:
                    if key in GRPO_PROCESS_WIDE_REASONS:
                        raise ValueError(
                            f"{where}: {key}={config[key]!r} cannot differ per run in one process "
                            f"({GRPO_PROCESS_WIDE_REASONS[key]}); set it in args instead"
                        )
                config = dict(config)
                if isinstance(config.get("scale_rewards"), bool):
                    config["scale_rewards"] = {True: "group", False: "none"}[config["scale_rewards"]]
                if "generation_batch_size" in config:
                    size = config.pop("generation_batch_size")
                    if "steps_per_generation" in config:
                        raise ValueError(f"{where}: set generation_batch_size or steps_per_generation, not both")
                    batch = config.get("per_device_train_batch_size", args.per_device_train_batch_size)
                    batch *= args.world_size
                    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % batch:
                        raise ValueError(
                            f"{where}: generation_batch_size={size!r} is invalid; it must be a positive multiple of "
                            f"the run's global batch size ({batch})"
                        )
                    config["steps_per_generation"] = size // batch
                run_configs.append(config)
        runs_dir = Path(args.output_dir) / "runs"
        specs = parse_configs(
            run_configs if run_configs is not None else configs,
            template,
            peft_config,
            self.per_run_fields,
            lambda name: runs_dir / name,
            isinstance(model, PeftModel),
        )
        validate_grpo_specs(specs, num_rewards, evaluates=eval_dataset is not None)
        refuse_ref_name(specs)
        _validate_setup(specs, args, num_chunks, optimizers, offload_optimizer)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required unless an `environment_factory` is provided.")
        _check_prompt_dataset(train_dataset, "train_dataset")
        _check_prompt_dataset(eval_dataset, "eval_dataset")
        model = _load_model(model, args, quantization_config)
        guard = contextlib.nullcontext()
        user_peft = isinstance(model, PeftModel)  # referenced as TRL references it (see RFDPOTrainer)
        model = _attach_run_adapters(model, specs, peft_config)
        if isinstance(model, PeftModel) and not user_peft:
            guard = no_ref_adapter_copy(model)
        with guard:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
            )
        self._rf_generation_kwargs = dict(getattr(self, "generation_kwargs", None) or {})
        self._rf_head_temperature = args.temperature
        self._build_runs(
            specs, num_chunks, offload_optimizer, control_socket, dashboard, policies, boundary_eval, checkpoint_every
        )
        # Clones (IC ops) build their arguments from the shared ones as the configs above were built.
        self._rf_shared_args = template

    def _check_run_spec(self, spec: RunSpec) -> None:
        from .preference import validate_grpo_specs

        validate_grpo_specs([spec], len(self.reward_funcs), evaluates=self.eval_dataset is not None)

    def _activate(self, run) -> None:
        super()._activate(run)
        self._patch_lm_head(self.temperature)

    # Experiment checkpoints: what of a run's GRPO state outlives a boundary. Its buffered generations (reused by the
    # next micro-steps, which may be in the next chunk) and the micro-step counter that says when to generate again;
    # the adaptive entropy coefficient; and the last generation's completions table (`_logs`, when it is JSON: no
    # images). Everything else is rebuilt from the run's arguments when it is activated.
    _CHECKPOINT_SCALARS = ("_step", "_current_train_step_time", "entropy_coef", "_last_world_entropy")

    def _checkpoint_extra_state(self, run, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        extra = super()._checkpoint_extra_state(run, tensors)
        attributes = run.attributes
        extra.update({name: attributes[name] for name in self._CHECKPOINT_SCALARS})
        buffer = attributes["_buffered_inputs"]
        extra["_buffered_inputs"] = None
        if buffer is not None:
            extra["_buffered_inputs"] = [
                {key: _stash(value, f"extra.buffer.{i}.{key}", tensors) for key, value in batch.items()}
                for i, batch in enumerate(buffer)
            ]
        extra["_entropy_window_stats"] = _stash(attributes["_entropy_window_stats"], "extra.entropy_window", tensors)
        logs = attributes["_logs"]
        table = {key: list(logs[key]) for key in ("prompt", "completion", "advantages")}
        table.update({key: {name: list(values) for name, values in logs[key].items()} for key in ("rewards", "extra")})
        try:
            extra["_logs"] = json.loads(json.dumps(table)) if not logs["images"] else None
        except (TypeError, ValueError):
            extra["_logs"] = None
        return extra

    def _load_extra_state(self, extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super()._load_extra_state(extra, tensors)
        if "_step" not in extra:
            return
        device = self.args.device
        for name in self._CHECKPOINT_SCALARS:
            setattr(self, name, extra[name])
        buffer = extra["_buffered_inputs"]
        self._buffered_inputs = None
        if buffer is not None:
            self._buffered_inputs = [
                {key: _unstash(value, tensors, device) for key, value in batch.items()} for batch in buffer
            ]
        self._entropy_window_stats = _unstash(extra["_entropy_window_stats"], tensors, device)
        if extra["_logs"] is not None:  # into the run's fresh deques (their maxlen is its generation batch)
            for key in ("prompt", "completion", "advantages"):
                self._logs[key].extend(extra["_logs"][key])
            for key in ("rewards", "extra"):
                for name, values in extra["_logs"][key].items():
                    self._logs[key][name].extend(values)

    def _patch_lm_head(self, temperature: float) -> None:
        """`GRPOTrainer.__init__` patches the base model's forward with a fused LM head that divides the logits by
        `args.temperature` (the log-probs of the loss must match the sampling temperature); with a per-run temperature
        the head is patched again, on the shared base, when a run with another temperature becomes active."""
        if temperature == self._rf_head_temperature:
            return
        from trl.trainer.utils import add_fused_lm_head

        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        base.__dict__.pop("forward", None)  # back to the model class's own forward, then patch it afresh
        cast = self._rf_shared_args.cast_lm_head_to_fp32
        add_fused_lm_head(base, temperature=temperature, cast_lm_head_to_fp32=cast, outputs=("log_probs", "entropy"))
        if self.ref_model is not None:
            self.ref_model.__dict__.pop("forward", None)
            add_fused_lm_head(self.ref_model, temperature=temperature, cast_lm_head_to_fp32=cast)
        self._rf_head_temperature = temperature

    def results(self) -> list[dict[str, Any]]:
        """`RFSFTTrainer.results()` plus each run's last logged reward, reward_std, per-function rewards, mean
        completion length and KL (train and eval)."""
        rows = []
        for run, row in zip(self.coordinator, super().results()):
            keys = list(self.result_metrics) + [f"rewards/{name}/mean" for name in self.reward_func_names]
            for key in keys:
                for logged in (key, f"eval_{key}"):
                    value = run.last_logged(logged)
                    if value is not None:
                        row[logged] = value
            rows.append(row)
        return rows

    # A run walks the data as its own `RepeatSampler` would: generation batches of `per_device_train_batch_size x
    # steps_per_generation` rows, each prompt repeated `num_generations` times, each group of prompts repeated
    # `steps_per_generation x num_iterations` times (the buffered generation is reused for those micro-steps).
    def _data_plan(self, spec: RunSpec, key: tuple, start_slice: int = 0):
        from .chunks import DataPlan

        args = spec.args
        if is_stream(self._rf_datasets[key][0]):
            raise ValueError(
                f"run {spec.name!r}: RFGRPOTrainer with configs needs a train set with a length (a datasets.Dataset): "
                "each run repeats its prompts the way GRPO's RepeatSampler does, which a stream (IterableDataset) "
                "cannot; pass a datasets.Dataset, or no configs for plain GRPOTrainer behaviour"
            )
        prompts_per_batch = args.generation_batch_size // args.num_generations
        repeats = args.num_iterations * args.steps_per_generation
        num_prompts = len(self._rf_datasets[key][0])
        if num_prompts < prompts_per_batch:
            raise ValueError(
                f"run {spec.name!r}: its generation batch needs {prompts_per_batch} prompts, but the train set has "
                f"{num_prompts}"
            )
        num_rows = (num_prompts // prompts_per_batch) * args.generation_batch_size * repeats
        return DataPlan.build(
            num_rows=num_rows,
            batch_size=args.per_device_train_batch_size * args.steps_per_generation,
            grad_accum=args.gradient_accumulation_steps,
            num_chunks=self._rf_num_chunks,
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            drop_last=True,
            start_slice=start_slice,
        )

    def _epoch_order(self, run, epoch: int) -> tuple[int, ...]:
        args = run.args
        return _grpo_epoch_order(
            len(self._rf_datasets[run.data_key][0]),
            epoch,
            args.seed,
            self.shuffle_dataset,
            args.generation_batch_size // args.num_generations,
            args.num_iterations * args.steps_per_generation,
            args.num_generations,
        )

    def _init_trainer_run_state(self, run) -> None:
        from collections import defaultdict, deque

        from transformers import GenerationConfig

        args = self.args  # the run's own arguments, set by `_init_run_state`
        self._train_batch_size = args.per_device_train_batch_size
        self.state.train_batch_size = args.per_device_train_batch_size
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._current_train_step_time = 0.0
        self._step = 0
        self._buffered_inputs = None
        size = args.generation_batch_size
        self._logs = {
            "images": deque(maxlen=size),
            "prompt": deque(maxlen=size),
            "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)),
            "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }
        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.max_completion_length = args.max_completion_length
        self.temperature, self.top_p, self.top_k, self.min_p = args.temperature, args.top_p, args.top_k, args.min_p
        self.repetition_penalty = args.repetition_penalty
        self.beta = args.beta
        self.num_iterations = args.num_iterations
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.importance_sampling_level = args.importance_sampling_level
        if args.reward_weights is not None:
            self.reward_weights = torch.tensor(args.reward_weights, dtype=torch.float32)
        else:
            self.reward_weights = torch.ones(len(self.reward_funcs), dtype=torch.float32)
        self.scale_rewards = args.scale_rewards
        self.loss_type = args.loss_type
        self.mask_truncated_completions = args.mask_truncated_completions
        self.top_entropy_quantile = args.top_entropy_quantile
        self.entropy_coef = args.entropy_coef  # adapted during training with use_adaptive_entropy: per run
        self._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
        self._last_world_entropy = float("inf")
        self._entropy_window_stats = None
        self.log_completions = args.log_completions
        self.num_completions_to_print = args.num_completions_to_print
        # As `GRPOTrainer.__init__` builds it (transformers generation; vLLM is refused per run).
        kwargs = dict(self._rf_generation_kwargs)
        kwargs.update(
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
        if args.generation_kwargs is not None:
            kwargs.update(args.generation_kwargs)
        self.generation_config = GenerationConfig(**kwargs, disable_compile=True)
        self.generation_kwargs = kwargs
