"""The coordinator: which run trains next, in chunk-major order.

Slice `k` is (epoch `k // num_chunks`, chunk `k % num_chunks`). The next run to train is the first active run, in
the order the runs were given, among those with the smallest next slice: every active run finishes slice `k` before
any run starts slice `k + 1`, so at each boundary all runs have seen the same data and their metrics compare fairly.
Runs whose budget ends earlier simply drop out of the rotation.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, ValuesView

from .run import ACTIVE_STATUSES, Run


class Coordinator:
    """Orders (run, slice) work across runs; also `trainer.runs`, a read-only mapping of run names to runs.

    `coordinator["a"]`, `"a" in coordinator`, `keys()`, `values()` and `items()` work as on a dict, but iterating
    yields the [`Run`] objects (in the order they were added), not their names.

    Args:
        runs (`Iterable[Run]`): The runs, in the order they were configured.
    """

    def __init__(self, runs: Iterable[Run]):
        self.runs: dict[str, Run] = {run.name: run for run in runs}

    def __getitem__(self, name: str) -> Run:
        try:
            return self.runs[name]
        except KeyError:
            raise KeyError(f"unknown run {name!r}; runs are {sorted(self.runs)}") from None

    def __contains__(self, item: str | Run) -> bool:
        # Without this, `in` would fall back to iterating the runs: names were never found, and a Run was found only
        # through dataclass equality (which compares its tensors). A Run counts when it is the one of that name.
        if isinstance(item, Run):
            return self.runs.get(item.name) is item
        return item in self.runs

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs.values())

    def __len__(self) -> int:
        return len(self.runs)

    def __repr__(self) -> str:
        return f"Coordinator({list(self.runs.values())!r})"

    def keys(self) -> KeysView[str]:
        """The run names, in the order the runs were added (clones after the configured runs)."""
        return self.runs.keys()

    def values(self) -> ValuesView[Run]:
        """The runs, in the order they were added (as iterating does)."""
        return self.runs.values()

    def items(self) -> ItemsView[str, Run]:
        """`(name, run)` pairs, in the order the runs were added."""
        return self.runs.items()

    def active(self) -> list[Run]:
        return [run for run in self.runs.values() if run.status in ACTIVE_STATUSES]

    def frontier(self) -> int | None:
        """The slices every active run has completed (the smallest next slice); `None` when no run is active."""
        return min((run.next_slice for run in self.active()), default=None)

    def frontier_runs(self) -> list[Run]:
        """The active runs at the frontier, in order: the (run, slice) work before any run starts a later slice."""
        active = self.active()
        frontier = min((run.next_slice for run in active), default=None)
        return [run for run in active if run.next_slice == frontier]

    def next_run(self) -> Run | None:
        """The run that trains the next slice, or `None` when no run is pending or running."""
        return next(iter(self.frontier_runs()), None)

    def total_steps(self) -> int:
        return sum(run.plan.max_steps for run in self.runs.values() if run.status != "deleted")
