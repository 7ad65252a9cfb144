"""`RotationLoop`: the training loop that replaces `Trainer._inner_training_loop` with a rotation over runs.

The coordinator picks a (run, slice); the engine swaps the run in (`engine.py`); the slice's optimizer steps run
through the trainer's own `training_step`, gradient clipping, optimizer and scheduler steps, callbacks and
`_maybe_log_save_evaluate` (the same calls, in the same order, as `Trainer._run_epoch`); at the boundary the run is
evaluated and parked again. Why not re-enter `Trainer.train()` per chunk: each re-entry rebuilds `TrainerState`,
restarts the dataloader at row 0 and spends ~0.3 s in `gc.collect()`.

The steps are a generator (`_train_steps`) that yields micro-batches and is sent back their losses, so the same
code drives one run (`_train_slice`) and a fused group (`fused.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from transformers.trainer_utils import TrainOutput, speed_metrics

from .adapters import save_adapter
from .chunks import epoch_order
from .control.server import ControlServer
from .oom import retry_after_oom
from .parking import capture_rng, restore_rng
from .run import Run
from .streams import RunStream

logger = logging.getLogger(__name__)


class RotationLoop:
    """The rotation loop and a run's endings (mixed into `MultiConfigMixin`, which builds the state it reads)."""

    def _inner_training_loop(
        self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None
    ) -> TrainOutput:
        schedule = self._rf_checkpoints.schedule
        if schedule.resume is not None:
            path, schedule.resume = schedule.resume, None
            self._rf_checkpoints.resume_from(path)
        else:
            self._rf_records.open()
        if self.model_wrapped is self.model and self._rf_dist is None:  # several processes: no DDP, see distributed.py
            model = self._wrap_model(self.model_wrapped)
            if model is self.model:
                model = self.accelerator.prepare_model(model)
            self.model_wrapped = model
        # several processes: rank 0 shows the bar of every run
        self._rf_progress.open(disable=self._rf_setup.args.disable_tqdm or not self._rf_records.is_main)
        self._memoize_mode_switch()
        self._rf_records.hold(True)
        server = dashboard = None
        if self._rf_setup.control_socket and self.args.should_save:
            server = ControlServer(self._rf_setup.output_dir / "control.sock", self.handle_request)
            server.start()
            if self._rf_setup.dashboard:
                from .dashboard.server import Dashboard

                dashboard = Dashboard(self._rf_setup.output_dir)
                print(f"rf-callbacks dashboard: {dashboard.start()}", flush=True)
        try:
            while True:
                if self._rf_dist is not None:  # several processes: rounds coordinated by rank 0
                    self._rf_dist.train(trial, ignore_keys_for_eval)
                    break
                self._rf_applier.apply_pending()
                with self._rf_ops.lock:
                    self._rf_checkpoints.maybe_write()
                run = self.coordinator.next_run()
                if run is None:
                    break
                group = self._rf_fused.group_of(run)
                if len(group) > 1:
                    self._rf_fused.train(group, trial, ignore_keys_for_eval)
                else:
                    self._train_slice(run, trial, ignore_keys_for_eval)
            with self._rf_ops.lock:
                self._rf_checkpoints.maybe_write(final=True)
            self._rf_records.hold(False)
        except BaseException as error:  # with one run errors propagate as in TRL; the run still ends `failed`
            run = self.active_run
            if self._rf_dist is None and run is not None and run.status == "running":
                self._fail(run, f"{type(error).__name__}: {error}".rstrip(": "))
            raise
        finally:
            if dashboard is not None:
                dashboard.stop()
            if server is not None:
                server.stop()
            with self._rf_ops.lock:
                self._rf_ops.training = False
                self._rf_applier.apply_pending()
            self._rf_progress.close()
            self._rf_records.sync()
            self._rf_records.write_info()  # the runs' final statuses
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
            self._rf_records.status(run)
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
            self._rf_records.write(run.name, self.state.global_step, run.current_chunk, "boundary")
        if finished or boundary:
            self._rf_checkpoints.schedule.passed()
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
            if finished or self._rf_ops.interrupt:  # an op (stop, delete) parks the run after this step
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
        shared = self._rf_setup.args
        return shared.data_seed if shared.data_seed is not None else shared.seed

    def _shuffle(self) -> bool:
        return self._rf_setup.args.train_sampling_strategy != "sequential"

    def _wants_eval(self, run: Run, finished: bool) -> bool:
        """Whether `run` is evaluated at the boundary it just reached (after slice `run.next_slice`)."""
        if self._evaluated_at_current_step():
            return False
        if finished or self._rf_setup.boundary_eval:
            return True
        slices = run.next_slice + 1
        return self._rf_policies.evaluates_at(slices)

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
        self._rf_records.status(run)

    def _fail(self, run: Run, reason: str, **extra: Any) -> None:
        if self.active_run is run:
            for param in run.trainable:  # only its own: in fused mode other runs may hold accumulated gradients
                param.grad = None
            run.rng = capture_rng()
        run.status, run.error, run.reason = "failed", reason, reason
        self._rf_records.status(run, error=reason, **extra)

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
