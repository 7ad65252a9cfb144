"""`RFSFTTrainer`: `trl.SFTTrainer` with the multi-run engine in front (per-run data preparation, SFT fields)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from peft import PeftConfig
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational

from ..configs import TRAINING_PER_RUN_FIELDS, RunSpec
from ..dropin import drop_in
from ..engine import RUN_ATTRIBUTES, MultiConfigMixin
from ..rf_args import RFArgs, RFOptions
from .builder import (
    checked_model,
    coerce_args,
    named_datasets,
    runs_on_one_model,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

SFT_PER_RUN_FIELDS = TRAINING_PER_RUN_FIELDS | {
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "loss_type",
}


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


def _check_sft_dataset(dataset: Any, name: str, args: SFTConfig, formatting_func: Callable | None) -> None:
    """Refuse, before any work, a data set `SFTTrainer` could only fail on later (or one without a length)."""
    for label, data in named_datasets(dataset, name):
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
        **options: The engine options of [`RFArgs`], listed below, the same for every RF trainer.

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

    @checked_model
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
        **options: Unpack[RFOptions],
    ):
        rf = RFArgs(**options)  # validated, naming the option
        args = coerce_args(model, args, SFTConfig, "SFT")
        specs, model, _ = runs_on_one_model(
            model,
            args,
            configs,
            peft_config,
            self.per_run_fields,
            optimizers=optimizers,
            quantization_config=quantization_config,
            datasets=(train_dataset, eval_dataset),
            check_specs=lambda specs: _validate_sft_specs(specs, compute_loss_func),
            check_dataset=lambda data, name: _check_sft_dataset(data, name, args, formatting_func),
        )
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
        self._build_runs(specs, rf)

    def _check_run_spec(self, spec: RunSpec) -> None:
        _validate_sft_specs([spec], self.compute_loss_func)

    # Per-run data: `max_length`, `truncation_mode`, `completion_only_loss` and `assistant_only_loss` are applied when
    # `SFTTrainer` prepares (tokenizes, masks, truncates) the data, so runs that differ in them get their own copy.
    def _data_key(self, args) -> tuple:
        return (args.max_length, args.truncation_mode, args.completion_only_loss, args.assistant_only_loss)

    def _prepare_run_datasets(self, args, key: tuple) -> tuple[Any, Any]:
        if key == self._data_key(self._rf_setup.args) or self._skip_prepare_dataset:
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
