"""Opt-in retry of a run whose optimizer step runs out of memory (`oom_retry=True` on the trainers).

When a run's step raises `torch.OutOfMemoryError` (`torch.cuda.OutOfMemoryError` is the same class) in its forward or
backward pass, the run is not failed at once: the partial step's gradients and the exception's frames are freed,
`torch.cuda.empty_cache()` is called (on a CUDA machine), the step's partial effects are undone (loss accumulator,
FLOP and token counters, TRL's metric buffers, random generators: each is recorded as every optimizer step begins),
and the run goes on from that step with `per_device_train_batch_size` halved and `gradient_accumulation_steps`
doubled. The effective batch is unchanged, and so are the run's rows per optimizer step, its data order, its steps per
epoch, its chunk boundaries and its LR schedule (with an even micro-batch, `ceil(ceil(2N/b) / 2g) = ceil(ceil(N/b) /
g)`): it is the same run, computed in smaller pieces. It is not bit-for-bit the run that would have fitted: the
micro-batches are padded differently, the losses are summed in another order and, with dropout on, the masks are drawn
for other tensor shapes; in fp32 without dropout the adapters agree to ~1e-7 relative (the test's 2-run SFT
experiment: max abs diff 1.5e-8 on weights up to 0.14).

This happens once per run. A second out-of-memory error fails the run, as does one that cannot be retried: a
micro-batch of odd size (halving it would change the effective batch), or an error outside the forward/backward pass
(in the optimizer step, where a smaller micro-batch would not help and the update may be half done, or in a logging,
evaluation or save after the step). The reason says which. The retry is recorded in the ledger (an `oom_retry` event),
in `results()` and `run.json` (`oom_retry`: the step, the error, the old and new sizes), and in experiment checkpoints
(a resumed experiment keeps the halved micro-batch).

With `fused=True` the retry applies to runs trained alone (`_train_slice`); a fused group that runs out of memory is
retried run by run by the fused round itself (`fused.py`), and a run whose own micro-batch still does not fit fails.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from .ledger import write_run_json
from .parking import capture_rng

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger(__name__)


@dataclass
class StepStart:
    """What the active run's optimizer step changes before it completes, as the step begins."""

    run: str
    global_step: int
    rng: dict[str, Any]
    tr_loss: torch.Tensor
    current_flos: float
    num_input_tokens_seen: int
    total_train_tokens: int | None
    metric_lengths: dict[str, dict[str, int]] | None


class StepWatch(TrainerCallback):
    """Records `StepStart` as each optimizer step of the active run begins, and where in the step the run is
    (`phase`: `"step"` in the forward/backward passes, `"optimizer"` in the optimizer and scheduler steps, `"done"`
    after them). Costs one copy of the random generators' state and of the loss accumulator per optimizer step.

    Args:
        trainer: The rf-callbacks trainer.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.start: StepStart | None = None
        self.phase: str | None = None
        self._epoch: tuple[str, int, dict[str, Any]] | None = None  # generators before an epoch's first draw

    def on_epoch_begin(self, args, state, control, **kwargs):
        run = self.trainer.active_run
        if run is not None:
            self._epoch = (run.name, state.global_step, capture_rng())
        self.phase = None

    def on_step_begin(self, args, state, control, **kwargs):
        trainer, run = self.trainer, self.trainer.active_run
        if run is None:
            return
        epoch, self._epoch = self._epoch, None
        # The epoch's first step starts before the draw the loop makes as an epoch begins: a retry redoes both.
        rng = epoch[2] if epoch is not None and epoch[:2] == (run.name, state.global_step) else capture_rng()
        metrics = getattr(trainer, "_metrics", None)
        lengths = None
        if isinstance(metrics, dict):
            lengths = {split: {key: len(values) for key, values in buf.items()} for split, buf in metrics.items()}
        self.start = StepStart(
            run=run.name,
            global_step=state.global_step,
            rng=rng,
            tr_loss=trainer._tr_loss.detach().clone(),
            current_flos=trainer.current_flos,
            num_input_tokens_seen=state.num_input_tokens_seen,
            total_train_tokens=getattr(trainer, "_total_train_tokens", None),
            metric_lengths=lengths,
        )
        self.phase = "step"

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.phase = "optimizer"

    def on_step_end(self, args, state, control, **kwargs):
        self.phase = "done"


def init_oom_retry(trainer, enabled: bool) -> None:
    """Turn the retry on for `trainer` (the last step of `MultiConfigMixin._build_runs`)."""
    trainer._rf_oom_watch = None
    if enabled and any(run.plan.stream for run in trainer.coordinator):
        raise ValueError(
            "oom_retry=True is not supported with a streamed train_dataset (an IterableDataset): a run's stream "
            "yields micro-batches of its batch size, which the retry would halve; use oom_retry=False"
        )
    if enabled:
        trainer._rf_oom_watch = StepWatch(trainer)
        trainer.add_callback(trainer._rf_oom_watch)


def halve_micro_batch(run: Run) -> None:
    """Halve the run's micro-batch and double its gradient accumulation, in its arguments and its data plan (the
    rows of every optimizer step stay the same)."""
    args, plan = run.args, run.plan
    args.per_device_train_batch_size //= 2
    args.gradient_accumulation_steps *= 2
    halved = dataclasses.replace(plan, batch_size=plan.batch_size // 2, grad_accum=plan.grad_accum * 2)
    if (halved.steps_per_epoch, halved.max_steps) != (plan.steps_per_epoch, plan.max_steps):  # never, by the above
        raise AssertionError(f"run {run.name!r}: halving its micro-batch changed its steps per epoch")
    run.plan = halved


def retry_after_oom(trainer, run: Run, error: Exception) -> bool:
    """Called where a run's slice raised: `True` when the run will go on from the step that ran out of memory with
    half the micro-batch (the caller then just returns; the coordinator picks the same run again, which resumes at
    its global step). `False` otherwise (the caller fails the run, or raises with one run); an out-of-memory error
    that is not retried then says why in its message."""
    watch = trainer._rf_oom_watch
    if watch is None or not isinstance(error, torch.OutOfMemoryError):
        return False
    # Free what the failed step held: its gradients, and the activations the exception's frames still reference.
    for param in run.trainable:  # only its own: in fused mode other runs may hold accumulated gradients
        param.grad = None
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    start, args = watch.start, run.args
    why = None
    if run.oom_retry is not None:
        why = f"again after the retry at step {run.oom_retry['step']}"
    elif watch.phase != "step" or start is None or (start.run, start.global_step) != (run.name, run.global_step):
        where = "optimizer step" if watch.phase == "optimizer" else "logging, evaluation or saving after a step"
        why = f"in the {where}; a smaller micro-batch would not help, not retried"
    elif args.per_device_train_batch_size % 2:
        why = f"per_device_train_batch_size={args.per_device_train_batch_size} cannot be halved, not retried"
    if why is not None:
        error.args = (f"{error} ({why})",)
        return False

    trainer._tr_loss = start.tr_loss
    trainer.current_flos = start.current_flos
    trainer.state.num_input_tokens_seen = start.num_input_tokens_seen
    if start.total_train_tokens is not None:
        trainer._total_train_tokens = start.total_train_tokens
    if start.metric_lengths is not None:
        for split, buffer in trainer._metrics.items():
            lengths = start.metric_lengths.get(split, {})
            for key in list(buffer):
                if key in lengths:
                    del buffer[key][lengths[key] :]
                else:
                    del buffer[key]
    run.rng = start.rng  # `_train_slice` restores it as the run goes on
    old = (args.per_device_train_batch_size, args.gradient_accumulation_steps)
    halve_micro_batch(run)
    trainer._train_batch_size = trainer.state.train_batch_size = run.plan.batch_size
    message = str(error).strip().splitlines()[0][:500] if str(error).strip() else ""
    run.oom_retry = {
        "step": run.global_step + 1,
        "error": f"{type(error).__name__}: {message}",
        "per_device_train_batch_size": [old[0], args.per_device_train_batch_size],
        "gradient_accumulation_steps": [old[1], args.gradient_accumulation_steps],
    }
    logger.warning(
        "run %r ran out of memory at step %d; retrying it with per_device_train_batch_size=%d and "
        "gradient_accumulation_steps=%d",
        run.name,
        run.global_step + 1,
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
    )
    trainer._rf_records.write(
        run.name, run.global_step, run.current_chunk, "oom_retry", reason=run.oom_retry["error"],
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )  # fmt: skip
    if args.should_save:
        write_run_json(run, args.output_dir)
    return True
