"""Seeded chunking: which rows each run trains on, in which order, split into `num_chunks` slices per epoch.

Every epoch the training set is shuffled once with the data seed (the same permutation accelerate's
`SeedableRandomSampler` gives plain `Trainer`, so one config reproduces plain TRL exactly), or kept in order with
`train_sampling_strategy="sequential"`. A run walks the epoch in micro-batches of its own batch size, grouped into
optimizer steps of its own gradient accumulation, exactly as `Trainer` does. The epoch's optimizer steps are then cut
into `num_chunks` contiguous, near-equal slices: chunk boundaries always fall between optimizer steps, so a run's
trajectory does not depend on where the chunks fall. Slice `k` of the whole experiment is epoch `k // num_chunks`,
chunk `k % num_chunks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def epoch_order(num_rows: int, epoch: int, seed: int, shuffle: bool) -> tuple[int, ...]:
    """Row order of one epoch: `torch.randperm` seeded with `seed + epoch`, as accelerate's seedable sampler does."""
    if not shuffle:
        return tuple(range(num_rows))
    generator = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(num_rows, generator=generator).tolist())


def check_num_chunks(num_chunks: object) -> None:
    """Refuse a `num_chunks` that is neither `"auto"` nor a positive int."""
    if num_chunks != "auto" and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"num_chunks={num_chunks!r} is invalid; it must be 'auto' or an int >= 1")


@dataclass(frozen=True)
class DataPlan:
    """How one run walks through the data: batches, optimizer steps, chunks and its total step budget.

    Args:
        num_rows (`int`): Rows in the run's (tokenized) training set.
        batch_size (`int`): The run's micro-batch size.
        grad_accum (`int`): Micro-batches per optimizer step.
        num_chunks (`int`): Chunks per epoch.
        max_steps (`int`): Optimizer steps in the whole run, as `Trainer` computes them.
        drop_last (`bool`): Whether the last incomplete micro-batch of an epoch is dropped.
        start_slice (`int`): The slice the run starts at: 0, or later for a clone that continues where its parent
            stopped (its `max_steps` then count from there).
        stream (`bool`): The train set is a stream without a length (`streams.py`): an epoch is the run's
            `max_steps` optimizer steps, as `Trainer` counts it, and `num_rows` the rows they hold.
    """

    num_rows: int
    batch_size: int
    grad_accum: int
    num_chunks: int
    max_steps: int
    drop_last: bool = False
    start_slice: int = 0
    stream: bool = False

    @classmethod
    def build(
        cls,
        num_rows: int,
        batch_size: int,
        grad_accum: int,
        num_chunks: int,
        max_steps: int,
        num_train_epochs: float,
        drop_last: bool = False,
        start_slice: int = 0,
        stream: bool = False,
    ) -> DataPlan:
        """Compute the step budget the way `Trainer.set_initial_training_values` does (max_steps wins over epochs;
        with a stream, `num_rows` is ignored and `max_steps` must be positive)."""
        if stream:
            num_rows = max_steps * grad_accum * batch_size
            return cls(num_rows, batch_size, grad_accum, num_chunks, max_steps, False, start_slice, stream=True)
        batches = num_rows // batch_size if drop_last else math.ceil(num_rows / batch_size)
        steps_per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
        if max_steps <= 0:
            max_steps = math.ceil(num_train_epochs * steps_per_epoch)
        return cls(num_rows, batch_size, grad_accum, num_chunks, max_steps, drop_last, start_slice)

    def check(self, name: str, chunks: bool = True) -> None:
        """Refuse a plan run `name` cannot train on: no micro-batch at all, or (`chunks`) fewer optimizer steps per
        epoch than chunks."""
        if self.batches_per_epoch == 0:
            drop = " and dataloader_drop_last=True drops a last incomplete batch" if self.drop_last else ""
            raise ValueError(
                f"run {name!r} has no training batch: its training set has {self.num_rows} rows after data "
                f"preparation (batch size {self.batch_size}{drop}); TRL drops the examples that truncation leaves "
                "empty, so check max_length and the data"
            )
        if chunks and self.steps_per_epoch < self.num_chunks:
            raise ValueError(
                f"num_chunks={self.num_chunks} is more than run {name!r} has optimizer steps per epoch "
                f"({self.steps_per_epoch}: {self.num_rows} rows, batch size {self.batch_size}, gradient "
                f"accumulation {self.grad_accum}); lower num_chunks to at most {self.steps_per_epoch}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size if self.drop_last else math.ceil(self.num_rows / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        batches = self.batches_per_epoch
        return max(batches // self.grad_accum + int(batches % self.grad_accum > 0), 1)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_steps / self.steps_per_epoch)

    @property
    def start_step(self) -> int:
        """Data position (optimizer steps from the first epoch's start) of the run's first step."""
        epoch, chunk = divmod(self.start_slice, self.num_chunks)
        return epoch * self.steps_per_epoch + self.chunk_bounds(chunk)[0]

    @property
    def end_slice(self) -> int:
        """One past the last slice the run trains in (the last one possibly cut short by `max_steps`)."""
        epoch, step = divmod(self.start_step + self.max_steps - 1, self.steps_per_epoch)
        return epoch * self.num_chunks + self.chunk_of_step(step) + 1

    @property
    def num_slices(self) -> int:
        return self.end_slice - self.start_slice

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Optimizer steps `[start, end)` within an epoch that belong to `chunk`."""
        steps = self.steps_per_epoch
        return chunk * steps // self.num_chunks, (chunk + 1) * steps // self.num_chunks

    def chunk_of_step(self, step_in_epoch: int) -> int:
        return next(c for c in range(self.num_chunks) if self.chunk_bounds(c)[1] > step_in_epoch)

    def slice_steps(self, slice_index: int, steps_done: int = 0) -> tuple[int, int, int]:
        """`(epoch, first_step, end_step)` of a slice in epoch-local optimizer steps, for a run that has already
        taken `steps_done` steps (a run stopped mid-chunk resumes where it left off), capped by `max_steps`."""
        epoch, chunk = divmod(slice_index, self.num_chunks)
        start, end = self.chunk_bounds(chunk)
        epoch_start = epoch * self.steps_per_epoch
        position = self.start_step + steps_done - epoch_start
        remaining = self.start_step + self.max_steps - epoch_start
        return epoch, min(max(start, position), remaining), min(end, remaining)

    def step_batches(self, step_in_epoch: int) -> range:
        """Micro-batch indices (within the epoch) that make up one optimizer step."""
        first = step_in_epoch * self.grad_accum
        return range(first, min(first + self.grad_accum, self.batches_per_epoch))

    def batch_rows(self, order: tuple[int, ...], batch_index: int) -> list[int]:
        return list(order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size])
