"""Streaming train sets: each run of the experiment walks its own pass over an `IterableDataset`.

A stream has no length, so `Trainer` needs `max_steps` and treats a run's whole budget as one epoch of `max_steps`
optimizer steps, restarting the stream (`set_epoch(n)`, then a fresh iterator) whenever it runs out. The engine does
the same per run: a run's chunks are `num_chunks` slices of its `max_steps` optimizer steps (`DataPlan(stream=True)`),
and each run draws from its own dataloader over the stream, built by the trainer's `get_train_dataloader()` while the
run is active (its batch size, its collator). Every run therefore reads the stream in the order it would read it
trained alone (a shuffled stream, `IterableDataset.shuffle(seed=...)`, is ordered by its seed and the epoch).

What it costs: K runs read and tokenize the stream K times (the data pipeline's work, not the model's), and a parked
run keeps its iterator (plus the one batch accelerate prefetches) in memory. A run that starts or goes on past the
stream's start in a fresh process (a clone that continues where its parent stopped, a run resumed from an experiment
checkpoint) reopens the stream and skips the micro-batches it already drew: it reads them again but does not train on
them, and the skipping leaves the random generators as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from transformers.trainer_utils import has_length

from .parking import capture_rng, restore_rng


def is_stream(dataset: Any) -> bool:
    """Whether a train set is a stream (no `len()`): an `IterableDataset` of `datasets` or of torch."""
    return dataset is not None and not has_length(dataset)


class RunStream:
    """One run's pass over a streamed train set: its dataloader, its iterator and how often it restarted.

    Args:
        dataloader (`torch.utils.data.DataLoader`): The run's dataloader over the stream (accelerate-prepared).
    """

    def __init__(self, dataloader: Any):
        self.dataloader = dataloader
        self.epoch = 0  # restarts so far: `Trainer`'s epoch with an iterable train set
        self.iterator: Iterator | None = None

    def next_batch(self) -> dict[str, Any]:
        """The next collated micro-batch, restarting the stream (as `Trainer`'s next epoch does) when it runs out."""
        fresh = False
        while True:
            if self.iterator is None:
                if hasattr(self.dataloader, "set_epoch"):
                    self.dataloader.set_epoch(self.epoch)
                self.iterator, fresh = iter(self.dataloader), True
            try:
                return next(self.iterator)
            except StopIteration:
                if fresh:
                    raise ValueError(
                        "train_dataset is a stream that yielded no batch; check the data set and its filters"
                    ) from None
                self.iterator, self.epoch = None, self.epoch + 1

    def skip(self, micro_batches: int) -> None:
        """Draw and drop `micro_batches` batches, leaving the random generators as they were."""
        rng = capture_rng()
        for _ in range(micro_batches):
            self.next_batch()
        restore_rng(rng)
