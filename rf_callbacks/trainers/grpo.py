"""`RFGRPOTrainer`: `trl.GRPOTrainer` with the multi-run engine in front (per-run generation state and sampler)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, TrainingArguments
from trl import GRPOConfig, GRPOTrainer

from ..configs import TRAINING_PER_RUN_FIELDS, RunSpec
from ..dropin import drop_in
from ..engine import RUN_ATTRIBUTES, MultiConfigMixin
from ..rf_args import RFArgs, RFOptions
from ..streams import is_stream
from .builder import (
    checked_model,
    named_datasets,
    refuse_fused,
    runs_on_one_model,
)
from .grpo_checks import GRPO_PROCESS_WIDE_REASONS, validate_grpo_specs
from .reference import reference_context, refuse_ref_name

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

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

# `GRPOTrainer.__init__` copies most per-run fields from `args` into attributes of the same name its generation and
# loss read (`epsilon` becomes `epsilon_low`; `steps_per_generation` and `delta` stay read from `args`). Each run has
# its own, as it has its own generation buffer (`_buffered_inputs`, reused for `steps_per_generation` x
# `num_iterations` micro-steps), its micro-step counter `_step` (which decides when to generate again), and its
# metric buffers.
_GRPO_RUN_ATTRIBUTES = (
    "_metrics",
    "_total_train_tokens",
    "_current_train_step_time",
    "_step",
    "_buffered_inputs",
    "_logs",
    "generation_config",
    "epsilon_low",
    "_entropy_bonus_enabled",
    "_last_world_entropy",
    "_entropy_window_stats",
    *sorted(GRPO_PER_RUN_FIELDS - TRAINING_PER_RUN_FIELDS - {"steps_per_generation", "delta", "epsilon"}),
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
    for label, data in named_datasets(dataset, name):
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

    @property
    def result_metrics(self) -> tuple[str, ...]:
        """What `results()` adds per run: reward, reward_std, completion length, KL and each reward function's mean."""
        own = tuple(f"rewards/{name}/mean" for name in self.reward_func_names)
        return ("reward", "reward_std", "completions/mean_length", "kl", *own)

    @checked_model
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
        **options: Unpack[RFOptions],
    ):
        rf = RFArgs(**options)  # validated, naming the option
        refuse_fused(rf.fused, "RFGRPOTrainer")
        plain_only = {"tools": tools, "rollout_func": rollout_func, "environment_factory": environment_factory}
        for name, value in plain_only.items():
            if value is not None:
                raise ValueError(
                    f"{name}= is supported by RFGRPOTrainer only as a plain GRPOTrainer (no configs): the engine "
                    "rotates runs over one generation loop that does not drive tools, custom rollouts or environments"
                )
        import copy

        if rf.oom_retry:
            raise ValueError(
                f"oom_retry={rf.oom_retry!r}: RFGRPOTrainer cannot retry a step that ran out of memory yet (a smaller "
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

        def check_specs(specs: list[RunSpec]) -> None:
            validate_grpo_specs(specs, num_rewards, evaluates=eval_dataset is not None)
            refuse_ref_name(specs)

        specs, model, user_peft = runs_on_one_model(
            model,
            args,
            run_configs if run_configs is not None else configs,
            peft_config,
            self.per_run_fields,
            optimizers=optimizers,
            quantization_config=quantization_config,
            datasets=(train_dataset, eval_dataset),
            check_specs=check_specs,
            check_dataset=_check_prompt_dataset,
            run_args=template,
            train_required="`train_dataset` is required unless an `environment_factory` is provided.",
        )
        with reference_context(model, user_peft):
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
        # Clones (IC ops) build their arguments from the shared ones as the configs above were built.
        self._build_runs(specs, rf, shared_args=template)

    def _check_run_spec(self, spec: RunSpec) -> None:
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
        cast = self._rf_setup.args.cast_lm_head_to_fp32
        add_fused_lm_head(base, temperature=temperature, cast_lm_head_to_fp32=cast, outputs=("log_probs", "entropy"))
        if self.ref_model is not None:
            self.ref_model.__dict__.pop("forward", None)
            add_fused_lm_head(self.ref_model, temperature=temperature, cast_lm_head_to_fp32=cast)
        self._rf_head_temperature = temperature

    # A run walks the data as its own `RepeatSampler` would: generation batches of `per_device_train_batch_size x
    # steps_per_generation` rows, each prompt repeated `num_generations` times, each group of prompts repeated
    # `steps_per_generation x num_iterations` times (the buffered generation is reused for those micro-steps).
    def _data_plan(self, spec: RunSpec, key: tuple, start_slice: int = 0):
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
        batch_size = args.per_device_train_batch_size * args.steps_per_generation
        return self._plan(args, num_rows, batch_size, drop_last=True, start_slice=start_slice)

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
