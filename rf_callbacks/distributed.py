"""Several processes (`accelerate launch --num_processes N script.py`): runs spread over processes, or one run
trained data-parallel by all of them.

`parallel="configs"` (the default when there are at least as many runs as processes). Every process holds the base
model and every run's adapter (adapters are built from each run's seed, so they start equal everywhere). Training goes
in rounds, one per frontier slice of the coordinator: every process learns what the others did in the last round
(each run's status, place in the data, `TrainerState` and its ledger records), rank 0 asks the policies and sends out
the ops to apply (user ops from its socket, dashboard and Python API included), every process applies them in the
same order, and all processes compute the same assignment of the frontier's (run, slice) work: a run stays on the
process that trained it last while that keeps the counts even, the rest go round-robin to the least loaded process.
A run that moves is written by the process that holds it with the checkpoint module's per-run writer (adapter,
weights at its last boundary, optimizer, scheduler, RNG, loss accumulators, trainer counters, `TrainerState`) and
sent with `torch.distributed` point-to-point (a gloo group, whatever backend trains), then read back with the
checkpoint module's reader: the same path a resumed experiment takes, so a run ends bit-for-bit where it would end in
one process. While a process trains its runs it sees accelerate as one process (`local_view`): no DDP wrapper, no
cross-process gathers in logging, TRL's metrics or evaluation, no sharded dataloaders, and each run's files (adapter,
`Trainer` checkpoints in its folder) are written by the process that holds it. The ledger, reporters, `run.json`,
`experiment.json`, the control socket and the dashboard are rank 0's: other ranks keep their ledger records and send
them at the end of the round.

`parallel="data"` (the default with fewer runs than processes). All processes train the same run at the same time,
rotating runs together: each optimizer step's global batch (`per_device_train_batch_size` x processes) is split in
contiguous per-process parts, and the active run's gradients are averaged across processes before clipping (no DDP
wrapper: DDP would fix the trainable parameters when it wraps the model, and each run trains its own adapter). Ops
and policies are decided on rank 0 and applied by every process at the next boundary.

Experiment checkpoints: rank 0 decides when one is due (counting every rank's boundaries), the ranks holding runs that
trained since the last one send their files, and rank 0 writes the checkpoint with the checkpoint module. A resume
loads every run on every rank (each then holds every run's state, so the first assignment moves nothing).

Limits: ops take effect at the next boundary round (a `stop` of the run that is training lets it end its slice);
`fused=True` refuses several processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from .ops import Op

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("auto", "configs", "data")
_LOCAL_KEYS = {
    "distributed_type": DistributedType.NO,
    "num_processes": 1,
    "process_index": 0,
    "local_process_index": 0,
}


def resolve_parallel(parallel: Any, world_size: int, num_runs: int) -> str | None:
    """The mode for `world_size` processes and `num_runs` runs; `None` in one process."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r} is invalid; use 'auto', 'configs' or 'data'")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and launched > 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate joined none of them, so each "
            "would train every run alone; on a machine without GPUs set use_cpu=True in the training arguments"
        )
    if world_size <= 1:
        return None
    if parallel == "auto":
        return "configs" if num_runs >= world_size else "data"
    return parallel


@contextlib.contextmanager
def local_view():
    """Make accelerate (and through it transformers and TRL) see one process, for training runs a process holds
    alone. `torch.distributed` itself stays initialised for this module's own calls."""
    saved = []
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        saved.append((shared, {key: shared[key] for key in _LOCAL_KEYS if key in shared}))
        shared.update({key: value for key, value in _LOCAL_KEYS.items() if key in shared})
    try:
        yield
    finally:
        for shared, values in saved:
            shared.update(values)


class DistributedMixin:
    """The trainer side: in data-parallel mode the active run's gradients are averaged after the last micro-batch of
    each optimizer step (`training_step` runs with the accelerator's sync flag set for it)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        coordination = self._rf_dist
        if coordination is None or coordination.mode != "data":
            return loss
        # Every rank must see the same verdict on a non-finite loss (a run fails on all of them, or on none): a rank
        # that failed the run alone would leave the others waiting in the next all-reduce.
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            loss = torch.full_like(loss, float("nan"))
        if self.accelerator.sync_gradients and self.active_run is not None:
            coordination.reduce_gradients(self.active_run.trainable)
        return loss


class Distributed:
    """Rank coordination for a `MultiConfigMixin` trainer launched on several processes."""

    def __init__(self, trainer: Any, mode: str):
        self.trainer, self.mode = trainer, mode
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        # Objects (run records, ops, run state) travel on the CPU, whatever backend trains (nccl needs CUDA tensors).
        self.group = dist.new_group(backend="gloo")
        self.owner: dict[str, int | None] = {}  # the rank holding a run's current state; None: every rank (untrained)
        self.trained: list[str] = []  # runs this rank trained in the last round
        self.boundaries: list[str] = []  # runs that reached a boundary (or failed) since the last sync
        self.rounds = 0
        self.migrations = 0
        self.boundaries_seen = 0  # the trainer's boundary count after the last sync

    @property
    def shards(self) -> int:
        """How many processes share one optimizer step's batch."""
        return self.world if self.mode == "data" else 1

    # ------------------------------------------------------------------------------------------ setup
    def check(self) -> None:
        """Called once the runs exist: settings that several processes cannot honour."""
        trainer = self.trainer
        if not self.main:
            from transformers.trainer_callback import PrinterCallback

            trainer.callback_handler.remove_callback(PrinterCallback)  # it prints every log; rank 0 prints them

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, trial, ignore_keys) -> None:
        """The whole training loop of this rank (every rank calls the same collectives in the same order)."""
        accelerator = self.trainer.accelerator
        if not accelerator._models:  # registered as one process would (no DDP wrapper), so evaluation logs the same
            with local_view():
                accelerator.prepare_model(self.trainer.model)
        if self.mode == "data":
            self._train_data(trial, ignore_keys)
        else:
            self._train_configs(trial, ignore_keys)

    def _train_configs(self, trial, ignore_keys) -> None:
        trainer = self.trainer
        while True:
            self._sync()
            self._checkpoint()
            todo = trainer.coordinator.frontier_runs()
            if not todo:
                break
            plan = self.assign(todo)
            self._migrate(todo, plan)
            mine = [run for run in todo if plan[run.name] == self.rank]
            with local_view():
                trainer._rf_records.recording(True)
                try:
                    for run in mine:
                        trainer._train_slice(run, trial, ignore_keys)
                    if trainer.active_run is not None:
                        trainer._park(trainer.active_run)
                finally:
                    trainer._rf_records.recording(False)
            self.trained = [run.name for run in mine]
            for run in mine:
                self.owner[run.name] = self.rank
            self.rounds += 1
        self._sync()  # nothing trains; the last ops are applied on every rank
        self._checkpoint(final=True)

    def _train_data(self, trial, ignore_keys) -> None:
        trainer = self.trainer
        while True:
            self.apply_ops()
            if self.main:  # every rank holds the same state: rank 0 writes it alone
                with trainer._rf_ops.lock:
                    trainer._rf_checkpoints.maybe_write()
            run = trainer.coordinator.next_run()
            if run is None:
                break
            trainer._train_slice(run, trial, ignore_keys)
            self._boundary_policies(self.boundaries)
            self.boundaries = []

    def assign(self, runs: list[Run]) -> dict[str, int]:
        """Which rank trains each of `runs` (the frontier's slices) this round; the same answer on every rank."""
        capacity = math.ceil(len(runs) / self.world)
        load = [0] * self.world
        plan: dict[str, int] = {}
        for run in runs:  # a run stays where its state is while that keeps the load even
            owner = self.owner.get(run.name)
            if owner is not None and load[owner] < capacity:
                plan[run.name] = owner
                load[owner] += 1
        for run in runs:
            if run.name not in plan:
                rank = min(range(self.world), key=lambda r: (load[r], r))
                plan[run.name] = rank
                load[rank] += 1
        return plan

    # ------------------------------------------------------------------------------------------ syncing
    def _sync(self) -> None:
        """End of a round: merge what every rank did, replay other ranks' records on rank 0, apply policies and ops."""
        trainer = self.trainer
        local = {
            "runs": [self._record(trainer.coordinator[name]) for name in self.trained],
            "ledger": trainer._rf_records.take_buffered(),
            "boundaries": self.boundaries,
            "boundaries_done": trainer._rf_checkpoints.schedule.boundaries - self.boundaries_seen,
        }
        self.trained, self.boundaries = [], []
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local, group=self.group)
        others = sum(payload["boundaries_done"] for rank, payload in enumerate(gathered) if rank != self.rank)
        trainer._rf_checkpoints.schedule.passed(others)  # checkpoints are numbered and due by every rank's boundaries
        self.boundaries_seen = trainer._rf_checkpoints.schedule.boundaries
        for rank, payload in enumerate(gathered):
            for record in payload["runs"]:
                self.owner[record["name"]] = rank
                if rank != self.rank:
                    self._merge(trainer.coordinator[record["name"]], record)
        if self.main:
            for rank, payload in enumerate(gathered):
                if rank != 0:
                    trainer._rf_records.replay(rank, payload["ledger"], trainer.coordinator.runs)
        order = {name: i for i, name in enumerate(trainer.coordinator.runs)}
        reached = sorted({name for payload in gathered for name in payload["boundaries"]}, key=order.__getitem__)
        self._boundary_policies(reached)
        self.apply_ops()

    def _boundary_policies(self, names: list[str]) -> None:
        """Rank 0 asks the policies about each run that reached a boundary; every rank applies the ops after each."""
        trainer = self.trainer
        for name in names:
            if self.main:
                trainer._ask_policies(trainer.coordinator[name])
            self.apply_ops()

    def apply_ops(self) -> None:
        """Rank 0's accepted ops, applied by every rank in the same order (a collective: every rank calls it)."""
        trainer = self.trainer
        with trainer._rf_ops.lock:  # held across the broadcast: an op submitted meanwhile waits for the next call
            pending: list[Op] = []
            payload: list[Any] = [None]
            if self.main:
                pending = trainer._rf_ops.take()
                times = {run.name: run.wall_time for run in trainer.coordinator} if self.mode == "data" else {}
                # The policies' memory (e.g. successive halving's rung), for `_wants_eval` on every rank
                policies = trainer._rf_policies.state_dict()
                payload = [([op.record() for op in pending], times, policies)]
            dist.broadcast_object_list(payload, src=0, group=self.group)
            records, times, policies = payload[0]
            if not self.main:
                trainer._rf_policies.load_state_dict(policies)
                pending = [Op.from_record(record) for record in records]
                for op in pending:
                    if op.kind == "clone":
                        op.spec = trainer._clone_spec(op)
                for name, wall_time in times.items():
                    trainer.coordinator[name].wall_time = wall_time
            for op in pending:
                trainer._rf_applier.apply(op)
                if op.kind == "clone" and op.name in trainer.coordinator.runs:
                    # A warm start (or copied optimizer) comes from the parent's state, which one rank holds.
                    carried = op.warm_start or op.copy_optimizer
                    self.owner[op.name] = self.owner.get(op.run) if carried else None

    # -------------------------------------------------------------------------------------- run records
    def _record(self, run: Run) -> dict[str, Any]:
        """The checkpoint's account of `run`, plus its live `TrainerState`."""
        return {**run.record(), "state": run.state}

    def _merge(self, run: Run, record: dict[str, Any]) -> None:
        """Take another rank's account of `run`, which it trained last round (this rank's copy is stale)."""
        run.load_record(record)
        run.dirty = True
        self.trainer._release(run)
        if record["state"] is not None:
            run.attributes["state"] = record["state"]

    # ------------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, final: bool = False) -> None:
        """An experiment checkpoint, if one is due: rank 0 decides and names the runs whose current state another
        rank holds; those ranks send their files (the per-run writer's output), and rank 0 writes the checkpoint."""
        trainer = self.trainer
        plan: list[Any] = [None]
        if self.main:
            due = trainer._rf_checkpoints.due(final)
            fetch = [
                (run.name, self.owner[run.name])
                for run in trainer.coordinator
                if self.owner.get(run.name) not in (None, 0) and (run.dirty or run.checkpoint_files is None)
            ]
            plan = [(due, fetch)]
        dist.broadcast_object_list(plan, src=0, group=self.group)
        due, fetch = plan[0]
        if not due:
            return
        sent: dict[str, dict[str, bytes]] = {}  # rank 0: the files of the runs other ranks hold
        for name, owner in fetch:
            if self.rank == owner:
                dist.send_object_list([self._files(trainer.coordinator[name])], dst=0, group=self.group)
            elif self.main:
                received: list[Any] = [None]
                dist.recv_object_list(received, src=owner, group=self.group)
                sent[name] = received[0]
        if self.main:
            with trainer._rf_ops.lock:
                trainer._rf_checkpoints.write(sent)
        else:
            trainer._rf_checkpoints.schedule.written()

    def _files(self, run: Run) -> dict[str, bytes]:
        """The checkpoint module's files for `run` (this rank holds its state), as bytes."""
        folder = Path(tempfile.mkdtemp(prefix="rf-run-"))
        try:
            self.trainer._rf_checkpoints.write_run(run, folder)
            return {path.name: path.read_bytes() for path in folder.iterdir()}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -------------------------------------------------------------------------------------- migration
    def _migrate(self, runs: list[Run], plan: dict[str, int]) -> None:
        """Move each run whose state is on another rank than the one that trains it next (point-to-point, in the
        runs' order, so every rank posts its sends and receives in the same sequence)."""
        for run in runs:
            source, target = self.owner.get(run.name), plan[run.name]
            if source is None or source == target:
                continue
            self.migrations += 1
            if self.rank == source:
                files = self._files(run)
                activated = "optimizer" in run.attributes
                dist.send_object_list([(files, activated)], dst=target, group=self.group)
                self.trainer._release(run)
            elif self.rank == target:
                received: list[Any] = [None]
                dist.recv_object_list(received, src=source, group=self.group)
                files, activated = received[0]
                self._restore(run, files, activated)
            self.owner[run.name] = target

    def _restore(self, run: Run, files: dict[str, bytes], activated: bool) -> None:
        trainer = self.trainer
        trainer._release(run)
        run.attributes = {}  # rebuilt by the checkpoint reader, from the sender's files
        folder = Path(tempfile.mkdtemp(prefix="rf-migrate-"))
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            with local_view():
                trainer._rf_checkpoints.restore_run(run, {**run.record(), "activated": activated}, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        run.checkpoint_files, run.dirty = None, True

    # -------------------------------------------------------------------------------------- data parallel
    def batch_part(self, rows: list[int], per_device: int) -> list[int]:
        """This rank's contiguous part of one micro-batch's global rows (a short last batch wraps around, as
        accelerate's `even_batches` does)."""
        part = rows[self.rank * per_device : (self.rank + 1) * per_device]
        while len(part) < per_device and rows:
            part = part + rows[: per_device - len(part)]
        return part

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the active run's gradients over the processes (what DDP does), in one flat all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
