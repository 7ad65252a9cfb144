"""A run: one config being trained, with its status, its place in the data and its parked trainer state.

While a run trains, its state lives in the trainer's own attributes (`args`, `state`, `optimizer`, ...), so TRL's
training step, loss, logging and callbacks work unchanged. At a boundary those attributes are copied into
`Run.attributes` and the next run's are copied in: a swap is a handful of pointer assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chunks import DataPlan
from .configs import RunSpec

# The trainer's per-run counters that are plain numbers (parked with the run, saved as JSON in checkpoints).
TRAINER_SCALARS = (
    "_total_loss_scalar",
    "_globalstep_last_logged",
    "_initial_num_input_tokens_seen",
    "_initial_global_step",
    "current_flos",
    "current_gradient_accumulation_steps",
)
STATUSES = ("pending", "running", "stopped", "completed", "failed", "deleted")
# A run's place in the experiment, as checkpoints record it and processes exchange it (`Run.record`): the one list.
RECORD_FIELDS = (
    "status",
    "next_slice",
    "slices_done",
    "wall_time",
    "error",
    "reason",
    "last_step",
    "train_metrics",
    "oom_retry",
    "clone",
)
ACTIVE_STATUSES = ("pending", "running")


@dataclass(repr=False)  # the generated repr would print every parked tensor (kilobytes per run)
class Run:
    """One run of the experiment.

    Args:
        spec ([`RunSpec`]): What the run was asked to do.
        plan ([`DataPlan`]): How it walks through the data.
        data_key (`tuple`): Which prepared data set it trains on (runs with equal data settings share one).
    """

    spec: RunSpec
    plan: DataPlan
    data_key: tuple
    status: str = "pending"
    next_slice: int = 0
    slices_done: int = 0
    wall_time: float = 0.0
    error: str | None = None
    reason: str | None = None  # why it has its status, when an op said so ("stopped by SuccessiveHalving at ...")
    attributes: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    pinned: dict = field(default_factory=dict)
    offloaded: bool = False
    last_step: tuple = (None, None)  # (grad_norm, learning_rate) of its last optimizer step, for epoch-end logs
    train_metrics: dict[str, Any] | None = None  # the final `train_loss`/speed metrics, once completed
    trainable: list = field(default_factory=list)  # its parameters that train (its adapter)
    trainable_names: list[str] = field(default_factory=list)
    boundary_weights: dict | None = None  # CPU copy of its adapter at its last boundary (for warm-start clones)
    optimizer_init: dict | None = None  # clone with copy_optimizer: the parent's optimizer state to start from
    num_parameters: int = 0  # base (without embeddings) + its adapter, for FLOPs estimates
    dirty: bool = True  # trained (or changed) since its files were last written to a checkpoint
    checkpoint_files: Path | None = None  # the checkpoint folder that holds its current files
    oom_retry: dict | None = None  # with oom_retry=True, its retry after running out of memory (see `oom.py`)
    stream: Any = None  # with a streamed train set, its own pass over the stream (`streams.RunStream`)
    clone: dict[str, Any] | None = None  # a clone: how it was made (parent, overrides, ...), to rebuild it on resume

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def args(self):
        return self.spec.args

    @property
    def state(self):
        """The run's `TrainerState` (global step, log history), or `None` before its first slice."""
        return self.attributes.get("state")

    @property
    def global_step(self) -> int:
        return self.state.global_step if self.state is not None else 0

    @property
    def current_chunk(self) -> int:
        return self.next_slice % self.plan.num_chunks

    @property
    def current_epoch(self) -> int:
        return self.next_slice // self.plan.num_chunks

    def slice_of_step(self, step: int) -> int:
        """The slice (`epoch * num_chunks + chunk`) in which the run took its optimizer step number `step` (from 1);
        its next slice before its first step. A value logged at step `step` belongs there, the final summary too."""
        if step < 1:
            return self.next_slice
        plan = self.plan
        epoch, in_epoch = divmod(plan.start_step + step - 1, plan.steps_per_epoch)
        return epoch * plan.num_chunks + plan.chunk_of_step(in_epoch)

    def record(self) -> dict[str, Any]:
        """Its `RECORD_FIELDS` as JSON values (what a checkpoint's manifest keeps of it, beside its files)."""
        record = {key: getattr(self, key) for key in RECORD_FIELDS}
        grad_norm, learning_rate = self.last_step
        record["last_step"] = [None if grad_norm is None else float(grad_norm), learning_rate]
        return {"name": self.name, **record}

    def load_record(self, record: dict[str, Any]) -> None:
        """Take the place `record` (from `record()`) describes; `clone` stays as built."""
        for key in RECORD_FIELDS:
            if key != "clone":
                setattr(self, key, record[key])
        self.last_step = tuple(record["last_step"])

    def __repr__(self) -> str:
        return (
            f"Run(name={self.name!r}, status={self.status!r}, global_step={self.global_step}/{self.plan.max_steps}, "
            f"chunks_done={self.slices_done})"
        )

    def last_logged(self, key: str) -> float | None:
        if self.state is None:
            return None
        return next((entry[key] for entry in reversed(self.state.log_history) if key in entry), None)

    def _train_loss(self) -> float | None:
        """The last logged loss; for a run that logged none (`logging_steps` above its steps), its mean train loss."""
        loss = self.last_logged("loss")
        return loss if loss is not None else (self.train_metrics or {}).get("train_loss")

    def _eval_loss(self) -> float | None:
        """The last `eval_loss`; with a dict of eval sets (`eval_<set>_loss` each), the first set's."""
        loss = self.last_logged("eval_loss")
        if loss is not None or self.state is None:
            return loss
        for entry in reversed(self.state.log_history):
            key = next((k for k in entry if k.startswith("eval_") and k.endswith("_loss")), None)
            if key is not None:
                return entry[key]
        return None

    def result(self) -> dict[str, Any]:
        """One row of `trainer.results()`."""
        metrics = {}
        for key in ("eval_mean_token_accuracy", "mean_token_accuracy"):
            value = self.last_logged(key)
            if value is not None:
                metrics[key] = value
        return {
            "name": self.name,
            "status": self.status,
            "global_step": self.global_step,
            "max_steps": self.plan.max_steps,
            "train_loss": self._train_loss(),
            "eval_loss": self._eval_loss(),
            "chunks_done": self.slices_done,
            "parent": self.spec.parent,
            "wall_time": round(self.wall_time, 3),
            "error": self.error,
            "reason": self.reason,
            "config": self.spec.summary,
            "oom_retry": self.oom_retry,
            **metrics,
        }
