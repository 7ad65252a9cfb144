"""`RFDPOTrainer`: `trl.DPOTrainer` with the multi-run engine in front (per-run loss fields, shared reference)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from peft import PeftConfig
from transformers import PreTrainedModel, TrainingArguments
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..configs import TRAINING_PER_RUN_FIELDS, RunSpec
from ..dropin import drop_in
from ..engine import RUN_ATTRIBUTES, MultiConfigMixin
from ..preference import DPO_PROCESS_WIDE_REASONS, validate_dpo_specs
from ..rf_args import RFArgs, RFOptions
from .builder import (
    checked_model,
    coerce_args,
    load_model,
    named_datasets,
    runs_on_one_model,
)
from .reference import reference_context, refuse_ref_name

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

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
    for label, data in named_datasets(dataset, name):
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

    @checked_model
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
        **options: Unpack[RFOptions],
    ):
        rf = RFArgs(**options)  # validated, naming the option

        args = coerce_args(model, args, DPOConfig, "DPO")
        for index, config in enumerate(configs or []):
            for key in config if isinstance(config, dict) else ():
                if key in DPO_PROCESS_WIDE_REASONS:
                    name = config.get("name", f"run-{index + 1}")
                    raise ValueError(
                        f"configs[{index}] ({name!r}): {key}={config[key]!r} cannot differ per run in one process "
                        f"({DPO_PROCESS_WIDE_REASONS[key]}); set it in args instead"
                    )

        def check_specs(specs: list[RunSpec]) -> None:
            validate_dpo_specs(specs)
            refuse_ref_name(specs)

        specs, model, user_peft = runs_on_one_model(
            model,
            args,
            configs,
            peft_config,
            self.per_run_fields,
            optimizers=optimizers,
            quantization_config=quantization_config,
            datasets=(train_dataset, eval_dataset),
            check_specs=check_specs,
            check_dataset=_check_preference_dataset,
        )
        if ref_model is not None:
            ref_model = load_model(ref_model, args, quantization_config)
        self._rf_raw = {"train": train_dataset, "eval": eval_dataset}
        self._rf_user_collator = data_collator is not None
        with reference_context(model, user_peft, ref_model):
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
        self._build_runs(specs, rf)

    def _check_run_spec(self, spec: RunSpec) -> None:
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
        if key == self._data_key(self._rf_setup.args) or self._is_vision_dataset:
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
