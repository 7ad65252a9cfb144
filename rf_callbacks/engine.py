"""`MultiConfigMixin`: the engine that trains several runs on one resident base model inside one TRL trainer.

The mixin sits in front of a TRL trainer class (`class RFSFTTrainer(MultiConfigMixin, SFTTrainer)`). It builds the
runs once the trainer exists (`_build_runs`: the one setup sequence every trainer shares), swaps a run's parked
state into the trainer's own attributes (`_activate` / `_park`), and narrows `Trainer`'s per-step helpers to the
active run. The loop itself, which replaces `Trainer._inner_training_loop`, is `loop.py`; the other parts (ops,
checkpoints, records, fused groups, several processes) are objects it holds, each using the trainer through the
interface docs/maintainers.md lists. The trainer is built once and the
base model is loaded once; a swap changes the active PEFT adapter and a few pointers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import ProgressCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState

from .adapters import save_adapter
from .checkpoint import RESUME_ENV, Checkpointer, Checkpoints
from .chunks import DataPlan
from .configs import RunSpec
from .coordinator import Coordinator
from .distributed import Distributed, DistributedMixin, resolve_parallel
from .fused import FusedRounds
from .interactive import InteractiveMixin
from .ledger import LogEventsCallback
from .loop import RotationLoop
from .oom import init_oom_retry
from .parking import (
    capture_rng,
    load_moments,
    offload_optimizer,
    optimizer_bytes,
    reload_optimizer,
    restore_rng,
    seeded_rng,
    should_offload,
)
from .policy_set import PolicySet
from .progress import RunsProgressCallback
from .records import Records, RecordsMixin
from .rf_args import RFArgs
from .run import TRAINER_SCALARS, Run
from .streams import is_stream

logger = logging.getLogger(__name__)

AUTO_CHUNKS = 4  # `num_chunks="auto"`: this many chunks per epoch, or fewer when a run has fewer optimizer steps


class _NameList(list):
    """A list with set-speed `in` (`Trainer.create_optimizer` tests every parameter name against it)."""

    def __init__(self, names):
        super().__init__(names)
        self._names = frozenset(names)

    def __contains__(self, name) -> bool:
        return name in self._names


# Trainer attributes that belong to the run being trained; they are swapped at every boundary.
RUN_ATTRIBUTES = (
    "args",
    "state",
    "control",
    "optimizer",
    "lr_scheduler",
    "train_dataset",
    "eval_dataset",
    "_train_batch_size",
    "_tr_loss",
    *TRAINER_SCALARS,
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The experiment-wide settings `_build_runs` fixes: every part reads them, none changes them.

    Args:
        args (`TrainingArguments`): The arguments every run's are built from: the output folder and the saving,
            logging and sampling settings the runs share; clones start from them too.
        num_chunks (`int`): Chunks per epoch, with `num_chunks="auto"` resolved.
        boundary_eval (`bool`), control_socket (`bool`), dashboard (`bool`), offload_optimizer (`bool` or `str`):
            The `RFArgs` options of the same names.
    """

    args: Any
    num_chunks: int
    boundary_eval: bool
    control_socket: bool
    dashboard: bool
    offload_optimizer: bool | str

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


class MultiConfigMixin(RotationLoop, DistributedMixin, InteractiveMixin, RecordsMixin):
    """Trains every run of `configs` on the trainer's one model, rotating runs at chunk boundaries.

    Subclasses put it before a TRL trainer in the bases, attach the runs' adapters to the model before
    `super().__init__()`, call `_build_runs` after it, and extend `run_attributes` with the trainer's own per-run
    attributes (e.g. its metric buffers).
    """

    run_attributes: tuple[str, ...] = RUN_ATTRIBUTES
    result_metrics: tuple[str, ...] = ()  # the trainer's own metrics `results()` reports (e.g. DPO's rewards)

    # ----------------------------------------------------------------------------------------------- building
    def _build_runs(self, specs: list[RunSpec], rf: RFArgs, shared_args: Any = None) -> None:
        """Create the runs, their data plans and the coordinator, once the trainer exists.

        The one setup sequence of every RF trainer, in this order: (1) fused groups, whose checks need the built
        trainer; (2) the processes, policies and the options the loop reads; (3) each run's prepared data and data
        plan, then `num_chunks="auto"`; (4) the runs and the coordinator; (5) the parts that need the runs:
        checkpoints, the progress bar, the records, the control queue; (6) several processes' own checks; (7) the
        out-of-memory retry, which needs the data plans.

        `shared_args` are the arguments clones are built from when they are not the trainer's own (GRPO's, with its
        batch-derived fields unset)."""
        self._rf_fused = FusedRounds(self, rf.fused, rf.max_fused)  # checks what fused mode cannot serve
        mode = resolve_parallel(rf.parallel, self.args.world_size, len(specs))  # several processes: see distributed.py
        self._rf_dist = Distributed(self, mode) if mode is not None else None
        self._rf_policies = PolicySet.check(rf.policies, self)
        self._rf_decay_names: tuple = (None, None)
        self._rf_base_parameters: int | None = None
        self._rf_setup = Setup(
            args=self.args if shared_args is None else shared_args,
            num_chunks=1 if rf.num_chunks == "auto" else rf.num_chunks,  # "auto": resolved once the plans exist
            boundary_eval=rf.boundary_eval,
            control_socket=rf.control_socket,
            dashboard=rf.dashboard,
            offload_optimizer=rf.offload_optimizer,
        )
        self._rf_active: Run | None = None
        self._rf_datasets: dict[tuple, tuple[Any, Any]] = {}
        self._rf_columns: dict[tuple, Any] = {}  # train sets as the dataloader would see them (unused columns gone)
        plans = []
        for spec in specs:
            key = self._prepare_data(spec.args)
            plans.append((spec, key, self._data_plan(spec, key)))
        if rf.num_chunks == "auto":
            chunks = min(AUTO_CHUNKS, *(plan.steps_per_epoch for _, _, plan in plans))
            self._rf_setup = dataclasses.replace(self._rf_setup, num_chunks=chunks)
            if len(specs) > 1:
                logger.info("num_chunks='auto': %d chunks per epoch", chunks)
        runs = []
        for spec, key, plan in plans:
            plan = dataclasses.replace(plan, num_chunks=self._rf_setup.num_chunks)
            plan.check(spec.name)
            runs.append(Run(spec=spec, plan=plan, data_key=key))
        self.coordinator = Coordinator(runs)
        self._rf_checkpoints = Checkpointer(self, Checkpoints.from_args(self._rf_setup.args, rf.checkpoint_every))

        # One bar over all runs replaces transformers' per-`train()` bar; the ledger sees every log of every run.
        self.callback_handler.remove_callback(ProgressCallback)
        self._rf_progress = RunsProgressCallback(self.coordinator, lambda: self._rf_active)
        self.add_callback(self._rf_progress)
        self.add_callback(LogEventsCallback(self._on_log))
        self._rf_records = Records(
            self._rf_setup.output_dir,
            self._claim_reporting(len(runs)),
            self._rf_setup.args.run_name,
            deferred=self._rf_checkpoints.schedule.every is not None,  # trackers show what a resume keeps
            is_main=self._rf_dist is None or self._rf_dist.main,  # several processes: rank 0 writes
            info=self._experiment_info,
        )
        self._init_control()
        if self._rf_dist is not None:
            self._rf_dist.check()
        init_oom_retry(self, rf.oom_retry)

    def _prepare_data(self, args) -> tuple:
        """The key of a run's data sets, prepared the first time a run with these data settings appears (initial
        runs and clones alike)."""
        key = self._data_key(args)
        if key not in self._rf_datasets:
            self._rf_datasets[key] = self._prepare_run_datasets(args, key)
            self._rf_columns[key] = self._train_columns(key)
        return key

    def _train_columns(self, key: tuple) -> Any:
        """The train set as the dataloader sees it (unused columns gone); `None` for a stream, which each run reads
        through its own dataloader (`streams.py`)."""
        train = self._rf_datasets[key][0]
        return None if is_stream(train) else self._remove_unused_columns(train, "training")

    def _data_plan(self, spec: RunSpec, key: tuple, start_slice: int = 0) -> DataPlan:
        args, stream = spec.args, is_stream(self._rf_datasets[key][0])
        if stream:
            if args.max_steps <= 0:
                raise ValueError(
                    f"run {spec.name!r}: train_dataset is a stream with no length (an IterableDataset), so max_steps "
                    f"must be set to a positive value, got max_steps={args.max_steps}"
                )
            if self._rf_dist is not None:
                raise ValueError(
                    "a streamed train_dataset (an IterableDataset) is not supported with several processes yet; "
                    "use a datasets.Dataset, or one process"
                )
        return self._plan(
            args,
            num_rows=None if stream else len(self._rf_datasets[key][0]),
            batch_size=args.per_device_train_batch_size * max(1, args.n_gpu) * self._rf_shards(),
            drop_last=args.dataloader_drop_last,
            start_slice=start_slice,
            stream=stream,
        )

    def _plan(
        self, args, num_rows: int | None, batch_size: int, drop_last: bool, start_slice: int, stream: bool = False
    ) -> DataPlan:
        """A run's plan from its arguments' budget and the trainer's chunk count; the trainer says how many rows an
        epoch has and how they are batched."""
        return DataPlan.build(
            num_rows=num_rows,
            batch_size=batch_size,
            grad_accum=args.gradient_accumulation_steps,
            num_chunks=self._rf_setup.num_chunks,
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            drop_last=drop_last,
            start_slice=start_slice,
            stream=stream,
        )

    def _rf_shards(self) -> int:
        return self._rf_dist.shards if self._rf_dist is not None else 1  # data-parallel: processes per global batch

    def _check_run_spec(self, spec: RunSpec) -> None:
        """The trainer's own checks of a run's arguments (DPO, GRPO), applied to clones as to the initial configs."""

    def _data_key(self, args) -> tuple:
        """Settings that change a run's prepared data; runs with equal keys share one tokenized data set."""
        return ()

    def _prepare_run_datasets(self, args, key: tuple) -> tuple[Any, Any]:
        """The (train, eval) data sets for runs whose data settings are `key`."""
        return self.train_dataset, self.eval_dataset

    # ------------------------------------------------------------------------------------------------ public
    @property
    def runs(self) -> Coordinator:
        """The runs by name (`trainer.runs["a"].state.log_history`)."""
        return self.coordinator

    @property
    def active_run(self) -> Run | None:
        """The run whose adapter, arguments, optimizer and state the trainer holds now (`None` between runs)."""
        return self._rf_active

    def results(self) -> list[dict[str, Any]]:
        """One dict per run: name, status, global_step, train_loss (last logged), eval_loss (last or `None`),
        chunks_done, parent, wall_time (seconds spent training it), error and its config; plus the trainer's
        `result_metrics` (last logged, train and eval) where a run logged them."""
        rows = []
        for run in self.coordinator:
            row = run.result()
            for key in self.result_metrics:
                for logged in (key, f"eval_{key}"):
                    value = run.last_logged(logged)
                    if value is not None:
                        row[logged] = value
            rows.append(row)
        return rows

    def select_run(self, name: str) -> None:
        """Make run `name` the trainer's current one, so `evaluate()`, `predict()` and `save_model()` use its adapter
        and arguments."""
        self._activate(self.coordinator[name])

    # -------------------------------------------------------------------------------------------- swapping
    def _activate(self, run: Run) -> None:
        """Swap `run`'s parked attributes into the trainer and make its adapter the active, trainable one."""
        if self._rf_active is run:
            return
        if self._rf_active is not None:
            self._park(self._rf_active)
        if isinstance(self.model, PeftModel):
            self.model.set_adapter(run.spec.adapter_name)
        if not run.attributes:
            self._init_run_state(run)
            trainable = [(name, param) for name, param in self.model.named_parameters() if param.requires_grad]
            run.trainable_names, run.trainable = [name for name, _ in trainable], [param for _, param in trainable]
            self._snapshot(run)
            if self._rf_base_parameters is None:  # the base without embeddings, counted once (a walk over all)
                adapters = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)
                self._rf_base_parameters = self.model.num_parameters(exclude_embeddings=True) - adapters
            run.num_parameters = self._rf_base_parameters + sum(p.numel() for p in run.trainable)
        if run.offloaded:
            reload_optimizer(run.attributes["optimizer"], run.attributes["args"].device)
            run.offloaded = False
        self._enter(run, rng=False)  # its generators are swapped in when its slice begins

    def _park(self, run: Run) -> None:
        self._sync_attributes(run)
        if should_offload(self._rf_setup.offload_optimizer, optimizer_bytes(self.optimizer)):
            offload_optimizer(self.optimizer, run.pinned)
            run.offloaded = True
        self._rf_active = None

    def _release(self, run: Run) -> None:
        """Drop this process's copy of `run`'s trainer state (optimizer, scheduler, generators, parked tensors); its
        `TrainerState` stays, for `results()`. A deleted run, or on several processes a copy another rank updated."""
        if self._rf_active is run:
            self._park(run)
        optimizer = run.attributes.get("optimizer")
        if optimizer is not None and optimizer in self.accelerator._optimizers:
            self.accelerator._optimizers.remove(optimizer)
        if optimizer is not None and self.callback_handler.optimizer is optimizer:
            self.callback_handler.optimizer = self.callback_handler.lr_scheduler = None
        state = run.attributes.get("state")
        run.attributes = {"state": state} if state is not None else {}
        run.trainable, run.trainable_names, run.pinned, run.rng, run.offloaded = [], [], {}, None, False

    def _sync_attributes(self, run: Run) -> None:
        """Copy the trainer's attributes of the active `run` into `run.attributes` (it stays active)."""
        for name in self.run_attributes:
            run.attributes[name] = getattr(self, name)

    def _enter(self, run: Run, rng: bool = True) -> None:
        """Swap `run`'s attributes (and with `rng`, its generators) in, keeping the model's adapters as they are: a
        member of a fused group, whose adapters all stay trainable (`fused.py`)."""
        for name in self.run_attributes:
            setattr(self, name, run.attributes[name])
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler
        self._rf_active = run
        if rng:
            restore_rng(run.rng)

    def _leave(self, run: Run) -> None:
        """Undo `_enter`: `run`'s attributes and generators' states back into `run`."""
        self._sync_attributes(run)
        run.rng = capture_rng()

    def _init_run_state(self, run: Run) -> None:
        """Build a run's optimizer, scheduler and `TrainerState` as `Trainer._inner_training_loop` would."""
        self.args = run.args
        self.train_dataset, self.eval_dataset = self._rf_datasets[run.data_key]
        self._train_batch_size = run.plan.batch_size
        self.optimizer, self.lr_scheduler = None, None
        self.create_optimizer()
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.create_scheduler(num_training_steps=run.plan.max_steps, optimizer=self.optimizer)
        if run.optimizer_init is not None:  # a clone with `copy_optimizer=True`: the parent's moments
            load_moments(self.optimizer, run.optimizer_init)
            run.optimizer_init = None
        self.control = TrainerControl()
        stateful = [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]
        self.state = TrainerState(stateful_callbacks=stateful)
        self.state.train_batch_size = run.plan.batch_size
        self.state.compute_steps(self.args, run.plan.max_steps)
        self.state.init_training_references(self, run.plan.max_steps, run.plan.num_epochs, None)
        self._tr_loss = torch.tensor(0.0, device=self.args.device)
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = 0
        self._initial_num_input_tokens_seen = 0
        self._initial_global_step = 0
        self.current_flos = 0
        self.current_gradient_accumulation_steps = 1
        self._init_trainer_run_state(run)
        run.attributes.update({name: getattr(self, name) for name in self.run_attributes})
        # `Trainer.__init__` seeds the generators just before `train()`; every run starts from that state.
        run.rng = seeded_rng(run.args.seed)

    def _init_trainer_run_state(self, run: Run) -> None:
        """Reset the trainer subclass's own per-run attributes (metric buffers, token counters)."""

    # ------------------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train every run, as `Trainer.train` does for one.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*):
                `True` continues the experiment from the newest checkpoint in `<output_dir>/checkpoints`, a path from
                that checkpoint (or the newest one under it). Build the trainer as the interrupted script did (same
                model, data and configs); clones, statuses, pending ops and policy state come from the checkpoint.
                `rf-callbacks resume --dir OUT` reruns the script with this set.
        """
        if resume_from_checkpoint is None and os.environ.get(RESUME_ENV):
            wanted = Path(os.environ[RESUME_ENV]).resolve()
            if wanted == self._rf_setup.output_dir.resolve() and not self._rf_records.started:
                resume_from_checkpoint = True
        if resume_from_checkpoint not in (None, False):
            if self._rf_records.started:
                raise ValueError("resume_from_checkpoint needs a freshly built trainer (this one has trained already)")
            self._rf_checkpoints.schedule.resume = self._rf_checkpoints.resolve(resume_from_checkpoint)
        idle = not self._rf_ops.pending and all(run.status not in ("pending", "running") for run in self.coordinator)
        if self._rf_records.started and self._rf_checkpoints.schedule.resume is None and idle:
            logger.warning(
                "train(): every run has ended (completed, stopped, failed or deleted), so there is nothing to train; "
                "resume or clone a run first. Unlike SFTTrainer, a second train() does not start over."
            )
        with self._rf_ops.lock:  # from here on ops wait for a safe point: `Trainer.train` moves the model around
            self._rf_ops.training = True
        try:
            return super().train(None, trial, ignore_keys_for_eval, **kwargs)
        finally:
            with self._rf_ops.lock:
                if self._rf_ops.training:  # the loop never started (an error before it): apply what waited
                    self._rf_ops.training = False
                    self._rf_applier.apply_pending()

    def close(self) -> None:
        """Close the reporters' tracking runs and the ledger; call it when done with the trainer. After an interrupted
        `train()` the reporters still hold what came after the last checkpoint: it is sent now (and the checkpoint
        notes it, so a resume does not send it twice)."""
        self._rf_checkpoints.reported(self._rf_records.send_held())
        self._rf_records.close()

    # Hooks of the checkpoint writer and reader (`checkpoint.Checkpointer`) for a trainer's own per-run state.
    def _checkpoint_extra_state(self, run: Run, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The trainer subclass's own per-run state that a boundary does not reset: returned as JSON, plus tensors
        added to `tensors` under keys starting with `extra.` (CPU copies; they go to `state.safetensors`)."""
        attributes, extra = run.attributes, {}
        if "_metrics" in attributes:
            extra["_metrics"] = {split: dict(values) for split, values in attributes["_metrics"].items()}
        if "_total_train_tokens" in attributes:
            extra["_total_train_tokens"] = attributes["_total_train_tokens"]
        return extra

    def _load_extra_state(self, extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Put back what `_checkpoint_extra_state` saved, into the trainer's attributes of the run being restored."""
        if "_metrics" in extra:
            self._metrics = {split: defaultdict(list, values) for split, values in extra["_metrics"].items()}
        if "_total_train_tokens" in extra:
            self._total_train_tokens = extra["_total_train_tokens"]

    # Per-step helpers of `Trainer` that walk every parameter of the model; with one adapter per run that walk grows
    # with the number of runs, so they are narrowed to the active run (same values: only its parameters have grads).
    def get_decay_parameter_names(self, model) -> list[str]:
        """`Trainer`'s list, computed once per set of adapters rather than once per run (a walk over every module)."""
        key = (id(model), tuple(getattr(self.model, "peft_config", ())))
        if self._rf_decay_names[0] != key:
            self._rf_decay_names = (key, _NameList(super().get_decay_parameter_names(model)))
        return self._rf_decay_names[1]

    def _clip_grad_norm(self, model):
        run = self._rf_active
        if run is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(run.trainable, self.args.max_grad_norm)

    def evaluate(self, *args, **kwargs):
        """`Trainer.evaluate` with the current run's adapter alone, also when called mid-group (`eval_steps`)."""
        members = self._rf_fused.members
        if not members:
            return super().evaluate(*args, **kwargs)
        self.model.set_adapter(self.active_run.spec.adapter_name)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            for run in members:
                for param in run.trainable:
                    param.requires_grad_(True)

    def _fused_model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a fused group's one forward, from its concatenated micro-batches (SFT: as they
        are; DPO adds its labels)."""
        return inputs

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """`Trainer`'s estimate (6 x tokens x parameters), counting the base and the active run's adapter only."""
        run, main_input = self._rf_active, getattr(self.model, "main_input_name", "input_ids")
        if run is None or main_input not in inputs:
            return super().floating_point_ops(inputs)
        return 6 * inputs[main_input].numel() * run.num_parameters

    # ------------------------------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save only the current run's adapter, in PEFT's format, directly in `output_dir` (checkpoints included)."""
        if not isinstance(self.model, PeftModel) or self._rf_active is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        save_adapter(self.model, self._rf_active.spec.adapter_name, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / "training_args.bin")
        return None
