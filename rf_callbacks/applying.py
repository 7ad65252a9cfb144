"""`OpApplier`: accepted IC ops applied to the runs at a safe point of the loop (or at once when no loop runs).

`stop` and `resume` change a run's status; `delete` frees its state, its boundary weights and its adapter; `clone`
adds the child run: its own data plan from the parent's next slice, its adapter (warm-started from the parent's
weights as of its last boundary with `warm_start=True`), the parent's optimizer moments with `copy_optimizer=True`.
A clone recorded in a checkpoint is rebuilt the same way (`restoring=True`), its state then loaded from there.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import PeftModel
from transformers import set_seed

from .configs import RunSpec
from .ops import VALID_FROM, Op
from .run import Run


class OpApplier:
    """Applies accepted ops to the runs of one trainer. It uses the trainer only through the interface
    `docs/maintainers.md` lists (a test holds it to the code).

    Args:
        trainer (`MultiConfigMixin`): the trainer whose runs the ops change.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def apply_pending(self) -> None:
        """Apply the ops waiting in the queue (the loop's safe points)."""
        trainer = self.trainer
        with trainer._rf_ops.lock:
            for op in trainer._rf_ops.take():
                self.apply(op)

    def apply(self, op: Op) -> None:
        """Apply one accepted op; one whose run has changed status since is recorded as skipped."""
        trainer = self.trainer
        run = trainer.coordinator[op.run]
        if run.status not in VALID_FROM[op.kind]:  # its status changed since the op was accepted (e.g. completed)
            reason = f"run is {run.status}"
            trainer._rf_records.write(
                op.run, run.global_step, run.current_chunk, "op_skipped", **op.describe(), reason=reason
            )
            return
        trainer._rf_records.write(op.run, run.global_step, run.current_chunk, "op_applied", **op.describe())
        if op.kind == "clone":
            self.add_clone(op, run)
            return
        if op.kind == "fail":
            trainer._fail(run, op.reason or f"failed by {op.source}", by=op.source)
            return
        if op.kind == "stop":
            run.status = "stopped"
        elif op.kind == "resume":
            run.status = "running" if run.attributes else "pending"
        else:
            self.free_run(run)
            run.status, run.dirty = "deleted", True
        run.reason = op.reason if op.kind != "resume" else None
        extra = {"reason": op.reason} if op.reason else {}
        trainer._rf_records.status(run, by=op.source, **extra)

    def free_run(self, run: Run) -> None:
        """A deleted run: its state, its weights at its last boundary and its adapter go."""
        trainer = self.trainer
        trainer._release(run)
        run.boundary_weights, run.stream = None, None
        if isinstance(trainer.model, PeftModel) and run.spec.adapter_name in trainer.model.peft_config:
            trainer.model.delete_adapter(run.spec.adapter_name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def add_clone(self, op: Op, parent: Run, start_slice: int | None = None, restoring: bool = False) -> None:
        """Add the child run of a clone op; `restoring` rebuilds one recorded in a checkpoint (its weights, optimizer
        and events come from there)."""
        trainer = self.trainer
        spec: RunSpec = op.spec
        key = trainer._prepare_data(spec.args)
        start_slice = parent.next_slice if start_slice is None else start_slice
        plan = trainer._data_plan(spec, key, start_slice=start_slice)
        child = Run(spec=spec, plan=plan, data_key=key, next_slice=plan.start_slice)
        child.clone = {**op.record(), "name": child.name, "start_slice": start_slice}  # the name as given or made
        set_seed(spec.args.seed)
        trainer._rf_mode = None  # its modules start in training mode, whatever the model's mode
        try:
            plan.check(child.name, chunks=False)  # e.g. a max_length override that truncates every example away
        except ValueError as error:
            child.error = str(error)
        if child.error is None:
            try:
                trainer.model.add_adapter(spec.adapter_name, spec.peft_config)
            except Exception as error:  # e.g. out of memory: the child fails, the experiment goes on
                if spec.adapter_name in trainer.model.peft_config:
                    trainer.model.delete_adapter(spec.adapter_name)
                child.error = f"adapter could not be built: {type(error).__name__}: {error}"
        if child.error is not None:
            child.status = "failed"
            trainer.coordinator.runs[child.name] = child
            trainer._rf_records.status(child, parent=parent.name, error=child.error, by=op.source)
            return
        if restoring:
            trainer.coordinator.runs[child.name] = child
            return
        if op.warm_start:
            self._warm_start(parent, spec)
        if op.copy_optimizer:
            optimizer = parent.attributes.get("optimizer")
            if optimizer is None and trainer.active_run is parent:
                optimizer = trainer.optimizer
            child.optimizer_init = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        trainer.coordinator.runs[child.name] = child
        child.reason = op.reason
        extra = {"reason": op.reason} if op.reason else {}
        trainer._rf_records.status(child, parent=parent.name, warm_start=op.warm_start, by=op.source, **extra)

    def _warm_start(self, parent: Run, spec: RunSpec) -> None:
        """Copy the parent's adapter as of its last boundary into the child's freshly added adapter."""
        trainer = self.trainer
        if parent.boundary_weights is None:  # never activated: its last boundary is its initial state
            source = parent.spec.adapter_name
            weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if f".{source}." in n}
        else:
            weights = parent.boundary_weights
        params = dict(trainer.model.named_parameters())
        old, new = f".{parent.spec.adapter_name}.", f".{spec.adapter_name}."
        with torch.no_grad():
            for name, value in weights.items():
                params[name.replace(old, new)].copy_(value)
