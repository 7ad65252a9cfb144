"""`MultiConfigMixin`: the engine that trains several runs on one resident base model inside one TRL trainer.

The mixin sits in front of a TRL trainer class (`class RFSFTTrainer(MultiConfigMixin, SFTTrainer)`) and replaces
`Trainer._inner_training_loop` with a rotation: the coordinator picks a (run, slice); the run's parked state is
swapped into the trainer's own attributes; the slice's optimizer steps run through the trainer's own
`training_step`, gradient clipping, optimizer and scheduler steps, callbacks and `_maybe_log_save_evaluate` (the
same calls, in the same order, as `Trainer._run_epoch`); at the boundary the run is evaluated and parked again.
The trainer is built once and the base model is loaded once; a swap changes the active PEFT adapter and a few
pointers. Why not re-enter `Trainer.train()` per chunk: each re-entry rebuilds `TrainerState`, restarts the
dataloader at row 0 and spends ~0.3 s in `gc.collect()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from transformers import ProgressCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import TrainOutput, speed_metrics

from .adapters import save_adapter
from .checkpoint import RESUME_ENV, CheckpointMixin
from .chunks import DataPlan, epoch_order
from .configs import RunSpec
from .control.server import ControlServer
from .coordinator import Coordinator
from .distributed import Distributed, DistributedMixin, resolve_parallel
from .fused import FusedMixin
from .interactive import InteractiveMixin
from .parking import (
    capture_rng,
    offload_optimizer,
    optimizer_bytes,
    reload_optimizer,
    restore_rng,
    seeded_rng,
    should_offload,
)
from .progress import RunsProgressCallback
from .reporters import Reporter
from .reporting import Ledger, LogEventsCallback, write_json_atomic
from .rf_args import RFArgs
from .run import TRAINER_SCALARS, Run
from .streams import RunStream, is_stream
from .tracking import TrackingMixin

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


class MultiConfigMixin(DistributedMixin, CheckpointMixin, InteractiveMixin, TrackingMixin, FusedMixin):
    """Trains every run of `configs` on the trainer's one model, rotating runs at chunk boundaries.

    Subclasses put it before a TRL trainer in the bases, attach the runs' adapters to the model before
    `super().__init__()`, call `_build_runs` after it, and extend `run_attributes` with the trainer's own per-run
    attributes (e.g. its metric buffers).
    """

    run_attributes: tuple[str, ...] = RUN_ATTRIBUTES
    result_metrics: tuple[str, ...] = ()  # the trainer's own metrics `results()` reports (e.g. DPO's rewards)

    # ----------------------------------------------------------------------------------------------- building
    def _build_runs(self, specs: list[RunSpec], rf: RFArgs) -> None:
        """Create the runs, their data plans and the coordinator, once the trainer exists."""
        mode = resolve_parallel(rf.parallel, self.args.world_size, len(specs))  # several processes: see distributed.py
        self._rf_dist = Distributed(self, mode) if mode is not None else None
        self._rf_policies = self._check_policies(rf.policies)
        self._rf_decay_names: tuple = (None, None)
        self._rf_base_parameters: int | None = None
        self._rf_boundary_eval = rf.boundary_eval
        self._rf_control_socket, self._rf_dashboard = rf.control_socket, rf.dashboard
        self._rf_shared_args = self.args
        self._rf_offload = rf.offload_optimizer
        self._rf_active: Run | None = None
        self._rf_datasets: dict[tuple, tuple[Any, Any]] = {}
        self._rf_columns: dict[tuple, Any] = {}  # train sets as the dataloader would see them (unused columns gone)
        self._rf_num_chunks = 1 if rf.num_chunks == "auto" else rf.num_chunks
        plans = []
        for spec in specs:
            key = self._data_key(spec.args)
            if key not in self._rf_datasets:
                self._rf_datasets[key] = self._prepare_run_datasets(spec.args, key)
                self._rf_columns[key] = self._train_columns(key)
            plans.append((spec, key, self._data_plan(spec, key)))
        if rf.num_chunks == "auto":
            self._rf_num_chunks = min(AUTO_CHUNKS, *(plan.steps_per_epoch for _, _, plan in plans))
            if len(specs) > 1:
                logger.info("num_chunks='auto': %d chunks per epoch", self._rf_num_chunks)
        runs = []
        for spec, key, plan in plans:
            plan = dataclasses.replace(plan, num_chunks=self._rf_num_chunks)
            plan.check(spec.name)
            runs.append(Run(spec=spec, plan=plan, data_key=key))
        self.coordinator = Coordinator(runs)
        self._rf_output_dir = Path(self._rf_shared_args.output_dir)
        self._init_checkpoints(rf.checkpoint_every)
        self._init_fused(rf.fused, rf.max_fused)

        # One bar over all runs replaces transformers' per-`train()` bar; the ledger sees every log of every run.
        self.callback_handler.remove_callback(ProgressCallback)
        self._rf_progress = RunsProgressCallback(self.coordinator, lambda: self._rf_active)
        self.add_callback(self._rf_progress)
        self._rf_ledger: Ledger | None = None
        self._rf_started = False
        self._rf_reporters: list[Reporter] = []
        self.add_callback(LogEventsCallback(self._on_log))
        self._rf_report_to = self._claim_reporting(len(runs))
        self._init_control()
        if self._rf_dist is not None:
            self._rf_dist.check()

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
        return DataPlan.build(
            num_rows=None if stream else len(self._rf_datasets[key][0]),
            batch_size=args.per_device_train_batch_size * max(1, args.n_gpu) * self._rf_shards(),
            grad_accum=args.gradient_accumulation_steps,
            num_chunks=self._rf_num_chunks,
            max_steps=args.max_steps,
            num_train_epochs=args.num_train_epochs,
            drop_last=args.dataloader_drop_last,
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
        for name in self.run_attributes:
            setattr(self, name, run.attributes[name])
        if run.offloaded:
            reload_optimizer(self.optimizer, self.args.device)
            run.offloaded = False
        for name in ("optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self._rf_active = run

    def _park(self, run: Run) -> None:
        self._sync_attributes(run)
        if should_offload(self._rf_offload, optimizer_bytes(self.optimizer)):
            offload_optimizer(self.optimizer, run.pinned)
            run.offloaded = True
        self._rf_active = None

    def _sync_attributes(self, run: Run) -> None:
        """Copy the trainer's attributes of the active `run` into `run.attributes` (it stays active)."""
        for name in self.run_attributes:
            run.attributes[name] = getattr(self, name)

    def _init_run_state(self, run: Run) -> None:
        """Build a run's optimizer, scheduler and `TrainerState` as `Trainer._inner_training_loop` would."""
        self.args = run.args
        self.train_dataset, self.eval_dataset = self._rf_datasets[run.data_key]
        self._train_batch_size = run.plan.batch_size
        self.optimizer, self.lr_scheduler = None, None
        self.create_optimizer()
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.create_scheduler(num_training_steps=run.plan.max_steps, optimizer=self.optimizer)
        if run.optimizer_init is not None:
            self._load_parent_optimizer(run)
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

    # ------------------------------------------------------------------------------------------- the loop
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
            if wanted == self._rf_output_dir.resolve() and not self._rf_started:
                resume_from_checkpoint = True
        if resume_from_checkpoint not in (None, False):
            if self._rf_started:
                raise ValueError("resume_from_checkpoint needs a freshly built trainer (this one has trained already)")
            self._rf_resume = self._resolve_checkpoint(resume_from_checkpoint)
        idle = not self._rf_pending and all(run.status not in ("pending", "running") for run in self.coordinator)
        if self._rf_started and self._rf_resume is None and idle:
            logger.warning(
                "train(): every run has ended (completed, stopped, failed or deleted), so there is nothing to train; "
                "resume or clone a run first. Unlike SFTTrainer, a second train() does not start over."
            )
        with self._rf_ops_lock:  # from here on ops wait for a safe point: `Trainer.train` moves the model around
            self._rf_training = True
        try:
            return super().train(None, trial, ignore_keys_for_eval, **kwargs)
        finally:
            with self._rf_ops_lock:
                if self._rf_training:  # the loop never started (an error before it): apply what waited
                    self._rf_training = False
                    self._apply_pending()

    def _inner_training_loop(
        self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None
    ) -> TrainOutput:
        if self._rf_resume is not None:
            path, self._rf_resume = self._rf_resume, None
            self._resume(path)
        else:
            self._open_experiment()
        if self.model_wrapped is self.model and self._rf_dist is None:  # several processes: no DDP, see distributed.py
            model = self._wrap_model(self.model_wrapped)
            if model is self.model:
                model = self.accelerator.prepare_model(model)
            self.model_wrapped = model
        self._rf_progress.open(disable=self._rf_shared_args.disable_tqdm)
        self._memoize_mode_switch()
        self._hold_reports(True)
        server = dashboard = None
        if self._rf_control_socket and self.args.should_save:
            server = ControlServer(self._rf_output_dir / "control.sock", self.handle_request)
            server.start()
            if self._rf_dashboard:
                from .dashboard.server import Dashboard

                dashboard = Dashboard(self._rf_output_dir)
                print(f"rf-callbacks dashboard: {dashboard.start()}", flush=True)
        try:
            while True:
                if self._rf_dist is not None:  # several processes: rounds coordinated by rank 0
                    self._rf_dist.train(trial, ignore_keys_for_eval)
                    break
                self._apply_pending()
                with self._rf_ops_lock:
                    self._maybe_checkpoint()
                run = self.coordinator.next_run()
                if run is None:
                    break
                group = self._fused_group(run)
                if len(group) > 1:
                    self._train_group(group, trial, ignore_keys_for_eval)
                else:
                    self._train_slice(run, trial, ignore_keys_for_eval)
            with self._rf_ops_lock:
                self._maybe_checkpoint(final=True)
            self._hold_reports(False)
        except BaseException as error:  # with one run errors propagate as in TRL; the run still ends `failed`
            run = self._rf_active
            if self._rf_dist is None and run is not None and run.status == "running":
                self._fail(run, f"{type(error).__name__}: {error}".rstrip(": "))
            raise
        finally:
            if dashboard is not None:
                dashboard.stop()
            if server is not None:
                server.stop()
            with self._rf_ops_lock:
                self._rf_training = False
                self._apply_pending()
            self._rf_progress.close()
            self._rf_ledger.sync()
            if self._rf_shared_args.should_save:  # the runs' final statuses
                write_json_atomic(self._rf_output_dir / "experiment.json", self._experiment_info())
            self.model.__dict__.pop("train", None)
        return self._train_output()

    def _memoize_mode_switch(self) -> None:
        """`Trainer.training_step` calls `model.train()` every micro-step and evaluation `model.eval()`; each walks
        every module, a walk that grows with the runs' adapters (~5 ms with 16 on the tiny model). While `train()`
        runs, skip it when the mode is already set; adding an adapter forgets the memo (its modules start in training
        mode)."""
        model, switch = self.model, type(self.model).train
        self._rf_mode = None

        def train(mode: bool = True):
            if self._rf_mode is not mode:
                switch(model, mode)
                self._rf_mode = mode
            return model

        model.train = train

    def _train_slice(self, run: Run, trial, ignore_keys_for_eval) -> None:
        """Train one (run, slice), or the rest of it, then handle what follows: a boundary, the run's end, or an op
        that interrupted it mid-chunk."""
        began, steps = self._begin_slice(run, trial, ignore_keys_for_eval)
        model = self.model_wrapped
        try:
            inputs, num_items_in_batch, sync_context = next(steps)
            while True:
                with sync_context():
                    loss = self.training_step(model, inputs, num_items_in_batch)
                inputs, num_items_in_batch, sync_context = steps.send(loss)
        except StopIteration as stop:
            finished, boundary = stop.value
        except Exception as error:
            from .oom import retry_after_oom

            if retry_after_oom(self, run, error):  # oom_retry=True: it goes on from that step, half the micro-batch
                return
            if len(self.coordinator) == 1:
                raise
            self._slice_failed(run, error)
            return
        run.rng = capture_rng()
        self._end_slice(run, finished, boundary, began, ignore_keys_for_eval)

    def _begin_slice(self, run: Run, trial, ignore_keys_for_eval) -> tuple[float, Generator]:
        """Activate `run` (starting it if pending) and return the start time and its slice's step generator."""
        self._activate(run)
        run.dirty = True
        if run.status == "pending":
            run.status = "running"
            self._status_event(run)
            self.model_wrapped.zero_grad()
            self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        restore_rng(run.rng)
        began = time.time()
        epoch, first, end = run.plan.slice_steps(run.next_slice, self.state.global_step)
        return began, self._train_steps(run, epoch, first, end, began - run.wall_time, trial, ignore_keys_for_eval)

    def _slice_failed(self, run: Run, error: Exception) -> None:
        logger.error("run %r failed", run.name, exc_info=error)
        self._fail(run, f"{type(error).__name__}: {error}")
        self._run_policies(run)

    def _end_slice(self, run: Run, finished: bool, boundary: bool, began: float, ignore_keys_for_eval) -> None:
        """After a slice: snapshot and evaluate at a boundary, close a finished run, let the policies act."""
        self._activate(run)
        if finished or boundary:
            self._snapshot(run)
            if self.eval_dataset is not None and self._wants_eval(run, finished):
                try:
                    self.evaluate(ignore_keys=ignore_keys_for_eval)  # logged under the chunk it ends
                except Exception as error:
                    if len(self.coordinator) == 1:
                        raise
                    self._slice_failed(run, error)
                    return
            run.next_slice += 1
            run.slices_done += 1
        run.wall_time += time.time() - began
        if finished:
            self._finish(run, time.time() - run.wall_time)
        elif boundary:
            self._rf_ledger.write(run.name, self.state.global_step, run.current_chunk, "boundary")
        if finished or boundary:
            self._rf_boundaries += 1
            self._rf_since_checkpoint += 1
            self._run_policies(run)

    def _snapshot(self, run: Run) -> None:
        """Keep a host copy of the run's adapter as of this boundary (what a warm-started clone starts from)."""
        run.boundary_weights = {
            name: param.detach().to("cpu", copy=True) for name, param in zip(run.trainable_names, run.trainable)
        }

    def _train_steps(
        self, run: Run, epoch: int, first: int, end: int, start_time: float, trial, ignore_keys
    ) -> Generator[tuple[dict, Any, Callable], torch.Tensor, tuple[bool, bool]]:
        """Optimizer steps `[first, end)` of `epoch`, mirroring `Trainer._run_epoch` call for call.

        A generator: for each micro-batch it yields `(inputs, num_items_in_batch, sync_context)` and is sent back
        the micro-batch's loss, once the driver has run the forward and backward (`_train_slice`: the trainer's own
        `training_step`; fused mode: one pass for several runs). Returns `(finished, boundary)`: whether the run is
        done (budget reached or a callback set `should_training_stop`), and whether it reached the end of the chunk
        (it may also stop earlier, when an op interrupts it).
        """
        plan, args, model = run.plan, self.args, self.model_wrapped
        isolate = len(self.coordinator) > 1  # a non-finite loss fails this run alone
        check_loss = isolate or args.logging_nan_inf_filter  # (a host sync per micro-step, only when needed)
        steps_in_epoch = plan.batches_per_epoch
        order = None if plan.stream else self._epoch_order(run, epoch)
        if first == 0:
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            if not plan.stream:  # a stream's own dataloader draws it when the run's first batch opens it
                # Plain Trainer's dataloader draws its workers' base seed from the global generator as an epoch starts.
                torch.empty((), dtype=torch.int64).random_()
        grad_norm, learning_rate = run.last_step
        position = first
        for step_in_epoch in range(first, end):
            batch_indices = plan.step_batches(step_in_epoch)
            batches = self._batches(run, order, batch_indices)
            batch_samples, num_items_in_batch = self.get_batch_samples(batches, len(batch_indices), args.device)
            self.current_gradient_accumulation_steps = len(batch_samples)
            for i, inputs in enumerate(batch_samples):
                step = batch_indices[i]
                do_sync_step = i == len(batch_samples) - 1
                self.accelerator.gradient_state._set_sync_gradients(do_sync_step)
                if i == 0:
                    self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                if (
                    self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
                    or self.accelerator.distributed_type == DistributedType.DEEPSPEED
                    or do_sync_step
                ):
                    sync_context = contextlib.nullcontext
                else:
                    sync_context = functools.partial(self.accelerator.no_sync, model=model)
                tr_loss_step = yield inputs, num_items_in_batch, sync_context  # the driver runs `training_step`
                # The accelerator's sync flag is process-wide and gates the optimizer step: other runs of a fused group
                # set theirs while this one waited.
                self.accelerator.gradient_state._set_sync_gradients(do_sync_step)
                finite = not check_loss or bool(torch.isfinite(tr_loss_step))
                if not finite and isolate:
                    raise FloatingPointError(f"loss is {tr_loss_step.item()} at step {self.state.global_step + 1}")
                if args.logging_nan_inf_filter and not finite:
                    self._tr_loss += self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
                else:
                    self._tr_loss += tr_loss_step
                self.current_flos += float(self.floating_point_ops(inputs))
                self._track_num_input_tokens(inputs)

                if do_sync_step:
                    grad_norm = None
                    if args.max_grad_norm > 0:
                        grad_norm = self._clip_grad_norm(model)
                    grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)
                    self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                    self.optimizer.step()
                    self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                    learning_rate = self._get_learning_rate()
                    if not self.accelerator.optimizer_step_was_skipped and not isinstance(
                        self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
                    ):
                        self.lr_scheduler.step()
                    for param in run.trainable:  # = model.zero_grad(): nothing else has gradients
                        param.grad = None
                    self.state.global_step += 1
                    self.state.epoch = epoch + (step + 1) / steps_in_epoch
                    self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                    self._maybe_log_save_evaluate(
                        self._tr_loss, grad_norm, model, trial, epoch, ignore_keys, start_time, learning_rate
                    )
                    position = step_in_epoch + 1
                else:
                    self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
            finished = self.control.should_training_stop or self.state.global_step >= plan.max_steps
            if finished or self._rf_interrupt:  # an op (stop, delete) parks the run after this step
                break
        run.last_step = (grad_norm, learning_rate)
        finished = self.control.should_training_stop or self.state.global_step >= plan.max_steps
        if finished or position == plan.steps_per_epoch:
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            self._maybe_log_save_evaluate(
                self._tr_loss, grad_norm, model, trial, epoch, ignore_keys, start_time, learning_rate
            )
        return finished, position >= end

    def _batches(self, run: Run, order: tuple[int, ...], batch_indices: range) -> Iterator[dict[str, Any]]:
        """Collated micro-batches, built lazily so `get_batch_samples` draws them like it draws from a dataloader."""
        if run.plan.stream:
            for _ in batch_indices:
                yield self._stream(run).next_batch()
            return
        dataset = self._rf_columns[run.data_key]
        for index in batch_indices:
            indices = run.plan.batch_rows(order, index)
            if self._rf_dist is not None and self._rf_dist.mode == "data":  # this process's part of the global batch
                indices = self._rf_dist.batch_part(indices, run.args.per_device_train_batch_size)
            rows = dataset[indices]
            yield self.data_collator([dict(zip(rows, values)) for values in zip(*rows.values())])

    def _stream(self, run: Run) -> RunStream:
        """The active run's pass over a streamed train set, opened at its first batch: where it would be trained
        alone, after the micro-batches it already drew (a clone continuing from its parent, a resumed run)."""
        if run.stream is None:
            run.stream = RunStream(self.get_train_dataloader())
            run.stream.skip((run.plan.start_step + self.state.global_step) * run.plan.grad_accum)
        return run.stream

    def _epoch_order(self, run: Run, epoch: int) -> tuple[int, ...]:
        """The rows of `epoch` in the order the run's dataloader yields them (overridden by a trainer with its own
        sampler, such as GRPO's prompt-repeating one)."""
        return epoch_order(run.plan.num_rows, epoch, self._data_seed(), self._shuffle())

    def _data_seed(self) -> int:
        shared = self._rf_shared_args
        return shared.data_seed if shared.data_seed is not None else shared.seed

    def _shuffle(self) -> bool:
        return self._rf_shared_args.train_sampling_strategy != "sequential"

    def _evaluated_at_current_step(self) -> bool:
        """Whether an evaluation (of any eval set: `eval_runtime`, `eval_<name>_runtime`) was logged at this step."""
        evals = (
            e
            for e in reversed(self.state.log_history)
            if any(k.startswith("eval_") and k.endswith("_runtime") for k in e)
        )
        last = next(evals, None)
        return last is not None and last["step"] == self.state.global_step

    # --------------------------------------------------------------------------------------- run endings
    def _finish(self, run: Run, start_time: float) -> None:
        """Close a run as `Trainer._finalize_training` closes training, then save its adapter and `run.json`."""
        self._total_loss_scalar += self._tr_loss.item()
        self._tr_loss -= self._tr_loss
        steps = self.state.global_step
        metrics = speed_metrics(
            "train",
            start_time,
            num_samples=run.plan.num_rows * steps / run.plan.steps_per_epoch,
            num_steps=steps,
        )
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = self._total_loss_scalar / max(steps, 0.001)
        self.log(metrics)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        run.train_metrics = metrics
        run.status = "completed"
        run.stream = None
        run_dir = Path(run.args.output_dir)
        if isinstance(self.model, PeftModel):
            if self.args.should_save:
                save_adapter(self.model, run.spec.adapter_name, run_dir)
        else:
            self.save_model(str(run_dir))
        self._status_event(run)

    def _fail(self, run: Run, reason: str, **extra: Any) -> None:
        if self._rf_active is run:
            for param in run.trainable:  # only its own: in fused mode other runs may hold accumulated gradients
                param.grad = None
            run.rng = capture_rng()
        run.status, run.error, run.reason = "failed", reason, reason
        self._status_event(run, error=reason, **extra)

    def _train_output(self) -> TrainOutput:
        runs = list(self.coordinator)
        if len(runs) == 1:
            metrics = runs[0].train_metrics or {}
            return TrainOutput(runs[0].global_step, metrics.get("train_loss", math.nan), metrics)
        losses = {run.name: (run.train_metrics or {}).get("train_loss") for run in runs}
        finished = [loss for loss in losses.values() if loss is not None]
        metrics = {f"{name}/train_loss": loss for name, loss in losses.items() if loss is not None}
        mean = sum(finished) / len(finished) if finished else math.nan
        return TrainOutput(sum(run.global_step for run in runs), mean, metrics)

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
