"""The public trainers: TRL's trainers with `MultiConfigMixin` in front.

`RFSFTTrainer` takes everything `trl.SFTTrainer` takes, plus `configs` (the runs to compare), `num_chunks` and
`offload_optimizer`. With no `configs` it trains one run from `peft_config`, exactly as `SFTTrainer` would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset
from peft import PeftConfig
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import create_model_from_path

from .adapters import attach_adapters
from .configs import TRAINING_PER_RUN_FIELDS, RunSpec, parse_configs
from .mixin import RUN_ATTRIBUTES, MultiConfigMixin

logger = logging.getLogger(__name__)

SFT_PER_RUN_FIELDS = TRAINING_PER_RUN_FIELDS | {
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "loss_type",
}


def _validate_setup(specs: list[RunSpec], args: TrainingArguments, num_chunks: Any, optimizers: tuple) -> None:
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks!r} is invalid; it must be an int >= 1")
    if len(specs) > 1 and any(item is not None for item in optimizers):
        raise ValueError(
            "optimizers=(optimizer, scheduler) holds one optimizer, but each of the "
            f"{len(specs)} runs needs its own; use optimizer_cls_and_kwargs=(cls, kwargs) or per-run 'optim' instead"
        )
    if len(specs) > 1 and args.load_best_model_at_end:
        raise ValueError("load_best_model_at_end=True is not supported with several runs; compare runs with results()")


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


def _check_sft_dataset(dataset: Any, name: str, args: SFTConfig, formatting_func: Callable | None) -> None:
    """Refuse, before any work, a data set `SFTTrainer` could only fail on later (or one without a length)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            _check_sft_dataset(value, f"{name}[{key!r}]", args, formatting_func)
        return
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"{name} is an IterableDataset; chunking needs a datasets.Dataset with a known length")
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{name} must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    if formatting_func is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return
    columns = set(dataset.column_names)
    accepted = [{args.dataset_text_field}, {"messages"}, {"conversations"}, {"prompt", "completion"}, {"input_ids"}]
    if not any(needed <= columns for needed in accepted):
        wanted = ", ".join("+".join(sorted(needed)) for needed in accepted)
        raise ValueError(
            f"{name} has columns {sorted(columns)}, but SFT needs one of: {wanted} (or pass formatting_func=)"
        )


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
            max_length, truncation_mode, completion_only_loss, assistant_only_loss, loss_type. When `None`, one run is
            trained from `peft_config` and `args`, exactly as `SFTTrainer` would train it.
        num_chunks (`int`, *optional*, defaults to `4`):
            Chunks per epoch. Runs rotate at chunk boundaries, where each run is also evaluated.
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
        num_chunks: int = 4,
        offload_optimizer: bool | str = True,
        control_socket: bool = True,
        dashboard: bool = False,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = SFTConfig(f"{model_name.split('/')[-1]}-SFT")
        elif not isinstance(args, SFTConfig):
            as_dict = args.to_dict()
            as_dict["hub_token"] = args.hub_token
            args = SFTConfig(**as_dict)
        runs_dir = Path(args.output_dir) / "runs"
        specs = parse_configs(configs, args, peft_config, self.per_run_fields, lambda name: runs_dir / name)
        _validate_setup(specs, args, num_chunks, optimizers)
        if offload_optimizer not in (True, False, "auto"):
            raise ValueError(f"offload_optimizer={offload_optimizer!r} is invalid; use True, False or 'auto'")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        _check_sft_dataset(train_dataset, "train_dataset", args, formatting_func)
        _check_sft_dataset(eval_dataset, "eval_dataset", args, formatting_func)
        model = _load_model(model, args, quantization_config)
        if any(spec.peft_config is not None for spec in specs):
            if hasattr(model, "peft_config"):
                raise ValueError(
                    "model is already a PeftModel; pass the base model and give each run its peft_config (the trainer "
                    "adds one adapter per run)"
                )
            model = attach_adapters(model, specs)
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
        )
        self._build_runs(specs, num_chunks, offload_optimizer, control_socket, dashboard)

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
