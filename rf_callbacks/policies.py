"""Automatic policies: decide at chunk boundaries which runs go on, using the same IC ops a person would.

The trainer calls every policy's `on_boundary(view)` each time a run ends a slice (a chunk of one epoch). The view
is a read-only snapshot of all runs; the policy answers with a list of `Op`s (`stop`, `resume`, `delete`, `clone`,
or `fail`), which are validated and applied like ops from the socket or the dashboard, so every decision lands in
the ledger, the reporters and the page with its reason ("stopped by SuccessiveHalving at chunk 2: eval_loss 5.91 >
cut 5.87"). A policy that raises is reported (log + ledger) and disabled; training goes on.

`view.frontier` is the number of slices every active run has completed: with chunk-major rotation, all active runs
stand at the same boundary when it grows, so their metrics compare fairly. Synchronous policies act when it grows;
per-run ones (`DivergenceGuard`) look at `view.run`, the run that just reached its boundary.

A metric name is checked against what the runs log: one that was never logged although values of its kind were (a
misspelt `"eval_los"`), or that is NaN for every run at a comparison, raises `MetricError`; the trainer records it
once in the ledger (`policy_error`) and disables the policy, so nothing is ranked on it (ranking on it would only stop
runs in creation order).

Usage:

```python
from rf_callbacks.policies import DivergenceGuard, SuccessiveHalving

trainer = RFSFTTrainer(..., configs=configs, num_chunks=16,
                       policies=[SuccessiveHalving(eta=2, min_chunks=1), DivergenceGuard(max_ratio=3.0)])
```
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .ops import Op

if TYPE_CHECKING:
    from .coordinator import Coordinator


@dataclass(frozen=True)
class RunView:
    """What a policy sees of one run.

    Args:
        name (`str`): The run's name.
        status (`str`): `pending`, `running`, `stopped`, `completed`, `failed` or `deleted`.
        index (`int`): Its position in creation order (ties are broken by it: the earlier run wins).
        slices (`int`): Slices it has reached (the global slice index of its next boundary, counted from the first
            chunk of the first epoch; a clone starts at its parent's).
        global_step (`int`): Its optimizer steps so far.
        max_steps (`int`): Its step budget.
        metrics (`dict[str, float]`): The last logged value of every metric (`loss`, `eval_loss`, ...).
        history (`list[dict]`): Its `TrainerState.log_history`.
        args (`TrainingArguments`): Its arguments (read them, do not change them: a `clone` op changes a copy).
        parent (`str`, *optional*): The run it was cloned from.
    """

    name: str
    status: str
    index: int
    slices: int
    global_step: int
    max_steps: int
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    args: Any
    parent: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ("pending", "running")


@dataclass(frozen=True)
class BoundaryView:
    """All runs, as a policy sees them when `run` has just reached a boundary.

    Args:
        run (`str`): The run that just ended a slice.
        frontier (`int`): Slices completed by every active run (the last boundary they all share).
        num_chunks (`int`): Chunks per epoch.
        runs (`dict[str, RunView]`): Every run, by name, in creation order.
    """

    run: str
    frontier: int
    num_chunks: int
    runs: dict[str, RunView]

    @classmethod
    def of(cls, run: str, runs: Coordinator, num_chunks: int) -> BoundaryView:
        """The view of the experiment's runs when `run` has just reached a boundary."""
        views = {}
        for index, each in enumerate(runs):
            history = list(each.state.log_history) if each.state is not None else []
            metrics = {k: v for entry in history for k, v in entry.items() if isinstance(v, (int, float))}
            views[each.name] = RunView(
                name=each.name,
                status=each.status,
                index=index,
                slices=each.next_slice,
                global_step=each.global_step,
                max_steps=each.plan.max_steps,
                metrics=metrics,
                history=history,
                args=each.args,
                parent=each.spec.parent,
            )
        frontier = runs.frontier()
        if frontier is None:  # no run is active: the last boundary any run reached
            frontier = max(view.slices for view in views.values())
        return cls(run=run, frontier=frontier, num_chunks=num_chunks, runs=views)

    def active(self) -> list[RunView]:
        """The runs still in the rotation (`pending` or `running`), in creation order."""
        return [view for view in self.runs.values() if view.active]


@runtime_checkable
class Policy(Protocol):
    """Anything with `on_boundary(view) -> list[Op]`; its class name is the `by` of its ops in the ledger.

    A policy may also define `evaluates_at(slices: int) -> bool`: whether it needs every run's eval metrics at the
    boundary after `slices` slices. With `boundary_eval=False` the trainer evaluates only there (and at each run's
    end); a policy without the method is taken to need every boundary. And `check_trainer(trainer) -> None`, called
    when the trainer is built, to refuse (`ValueError`) arguments that depend on the trainer (`Explore.perturb`).
    """

    def on_boundary(self, view: BoundaryView) -> list[Op]: ...


class MetricError(ValueError):
    """A policy's metric cannot be compared: it was never logged (a misspelt name?) or is NaN for every run."""


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def _check_metric(metric: Any) -> None:
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"metric must be the non-empty name of a logged value (e.g. 'eval_loss'), got {metric!r}")


def _check_logged(view: BoundaryView, metric: str, where: str) -> bool:
    """Whether any run has logged `metric`; `False` while nothing of its kind was logged yet (no evaluation so far, or
    a `logging_steps` longer than a chunk). Raises `MetricError` when values of its kind were logged but never it."""
    logged = {key for run in view.runs.values() for key in run.metrics}
    if metric in logged:
        return True
    evaluation = metric.startswith("eval_")
    # Every trainer's training log carries `loss`; every evaluation logs `eval_*` values.
    if not (any(key.startswith("eval_") for key in logged) if evaluation else "loss" in logged):
        return False
    from .configs import _suggest  # here, not at the top: this module stays light (it imports no transformers)

    kind = sorted(key for key in logged - {"step", "epoch"} if key.startswith("eval_") == evaluation)
    shown = ", ".join(kind[:10]) + (", ..." if len(kind) > 10 else "")
    raise MetricError(f"metric {metric!r} was not logged by any run {where} (logged: {shown}){_suggest(metric, kind)}")


def _ranked(runs: list[RunView], metric: str, mode: str) -> list[tuple[float, RunView]]:
    """Runs best first; a run without the metric (or with NaN) ranks last; ties keep creation order."""

    def key(view: RunView) -> tuple[bool, float, int]:
        value = view.metrics.get(metric)
        missing = value is None or math.isnan(value)
        return missing, 0.0 if missing else (value if mode == "min" else -value), view.index

    return [(view.metrics.get(metric, math.nan), view) for view in sorted(runs, key=key)]


def _rank(view: BoundaryView, runs: list[RunView], metric: str, mode: str, where: str) -> list | None:
    """`_ranked(runs)`, or `None` (act later) while nothing of the metric's kind was logged yet.

    Raises:
        `MetricError`: the metric was never logged although values of its kind were, or it is missing or NaN for
            every one of `runs`: ranking would only keep them in creation order.
    """
    ranked = _ranked(runs, metric, mode)
    if any(not math.isnan(value) for value, _ in ranked):
        return ranked
    if _check_logged(view, metric, where):
        raise MetricError(f"metric {metric!r} is missing or NaN for every active run {where}")
    return None


def _versus(metric: str, value: float, mode: str, label: str, bar: float) -> str:
    if math.isnan(value):
        return f"no {metric} value (ranks last)"
    return f"{metric} {value:.6g} {_worse(mode)} {label} {bar:.6g}"


def _worse(mode: str) -> str:
    return ">" if mode == "min" else "<"


@dataclass
class SuccessiveHalving:
    """Synchronous successive halving over the runs still active.

    Rung `k` is reached after `min_chunks * eta**k` slices; there the best `max(1, n // eta)` of the `n` active runs
    are kept and the others stopped (they keep their state: `resume` brings one back). Halving ends when one run
    remains; it trains to the end.

    A run without a value (never logged, or NaN) ranks last. A rung where no run has one yet (no training log so far)
    is judged at the first boundary that has them; a metric never logged at all, or NaN for every run, raises
    `MetricError` (recorded once in the ledger, and the policy is disabled: no run is stopped on it).

    Args:
        metric (`str`, *optional*, defaults to `"eval_loss"`): The logged value to compare (`"loss"` for train loss).
        mode (`str`, *optional*, defaults to `"min"`): `"min"` or `"max"`.
        eta (`int`, *optional*, defaults to `2`): Reduction factor (keep 1/eta per rung).
        min_chunks (`int`, *optional*, defaults to `1`): Slices before the first rung.
    """

    metric: str = "eval_loss"
    mode: str = "min"
    eta: int = 2
    min_chunks: int = 1
    rung: int = field(default=0, init=False)
    done: bool = field(default=False, init=False)  # one run left: no more rungs to judge

    def __post_init__(self):
        _check_metric(self.metric)
        _check_mode(self.mode)
        if not isinstance(self.eta, int) or self.eta < 2:
            raise ValueError(f"eta must be an integer >= 2, got {self.eta!r}")
        if not isinstance(self.min_chunks, int) or self.min_chunks < 1:
            raise ValueError(f"min_chunks must be an integer >= 1, got {self.min_chunks!r}")

    def rung_slices(self, rung: int) -> int:
        return self.min_chunks * self.eta**rung

    def evaluates_at(self, slices: int) -> bool:
        if self.done:
            return False
        rung = 0
        while self.rung_slices(rung) < slices:
            rung += 1
        return self.rung_slices(rung) == slices

    def on_boundary(self, view: BoundaryView) -> list[Op]:
        ops: list[Op] = []
        active = view.active()
        while len(active) > 1 and view.frontier >= self.rung_slices(self.rung):
            ranked = _rank(view, active, self.metric, self.mode, f"at rung {self.rung} (chunk {view.frontier})")
            if ranked is None:
                break  # nothing logged yet: this rung is judged at a later boundary
            keep = max(1, len(ranked) // self.eta)
            cut = ranked[keep - 1][0]
            for value, run in ranked[keep:]:
                reason = (
                    f"stopped by SuccessiveHalving at chunk {view.frontier} (rung {self.rung}, kept {keep} of "
                    f"{len(ranked)}): {_versus(self.metric, value, self.mode, 'cut', cut)}"
                )
                ops.append(Op("stop", run.name, source=type(self).__name__, reason=reason))
            active = [run for _, run in ranked[:keep]]
            self.rung += 1
        self.done = self.done or (len(active) <= 1 and bool(ops))
        return ops


@dataclass
class MedianStopping:
    """Stop a run whose metric is worse than the median of the active runs at the same boundary.

    Unlike Optuna's `MedianPruner`, which compares with finished trials (there are none in a rotation), the median is
    taken over the running peers, all at the same chunk. A run without a value (never logged, or NaN) is neither
    counted nor stopped; a metric never logged at all, or NaN for every run, raises `MetricError` (recorded once in
    the ledger, and the policy is disabled).

    Args:
        metric (`str`, *optional*, defaults to `"eval_loss"`): The logged value to compare.
        mode (`str`, *optional*, defaults to `"min"`): `"min"` or `"max"`.
        min_chunks (`int`, *optional*, defaults to `1`): Slices before the first comparison.
        min_runs (`int`, *optional*, defaults to `2`): Compare only while at least this many runs are active.
    """

    metric: str = "eval_loss"
    mode: str = "min"
    min_chunks: int = 1
    min_runs: int = 2
    checked: int = field(default=0, init=False)  # the last frontier compared

    def __post_init__(self):
        _check_metric(self.metric)
        _check_mode(self.mode)
        if not isinstance(self.min_chunks, int) or self.min_chunks < 1:
            raise ValueError(f"min_chunks must be an integer >= 1, got {self.min_chunks!r}")
        if not isinstance(self.min_runs, int) or self.min_runs < 2:
            raise ValueError(f"min_runs must be an integer >= 2, got {self.min_runs!r}")

    def evaluates_at(self, slices: int) -> bool:
        return slices >= self.min_chunks

    def on_boundary(self, view: BoundaryView) -> list[Op]:
        if view.frontier < self.min_chunks or view.frontier <= self.checked:
            return []
        self.checked = view.frontier
        ranked = _rank(view, view.active(), self.metric, self.mode, f"at chunk {view.frontier}") or []
        scored = [(value, run) for value, run in ranked if not math.isnan(value)]
        if len(scored) < self.min_runs:
            return []
        median = statistics.median(value for value, _ in scored)
        worse = (lambda v: v > median) if self.mode == "min" else (lambda v: v < median)
        return [
            Op(
                "stop",
                run.name,
                source=type(self).__name__,
                reason=f"stopped by MedianStopping at chunk {view.frontier}: {self.metric} {value:.6g} "
                f"{_worse(self.mode)} median {median:.6g} of {len(scored)} runs",
            )
            for value, run in scored
            if worse(value)
        ]


@dataclass
class DivergenceGuard:
    """Fail a run whose loss is NaN/inf or rises above `max_ratio` times its first logged loss.

    Every value logged since the last check counts, not only the last one. A NaN/inf `grad_norm` counts as
    divergence too: with `logging_nan_inf_filter=True` (transformers' default) the logged loss hides NaN steps.
    A metric never logged by any run although values of its kind were (a misspelt name) raises `MetricError`
    (recorded once in the ledger, and the guard is disabled) rather than guarding nothing in silence.

    Args:
        max_ratio (`float`, *optional*, defaults to `3.0`): Allowed rise over the first logged value.
        metric (`str`, *optional*, defaults to `"loss"`): The logged value to watch.
    """

    max_ratio: float = 3.0
    metric: str = "loss"
    seen: dict[str, int] = field(default_factory=dict, init=False)  # run -> log entries already checked

    def __post_init__(self):
        _check_metric(self.metric)
        if not isinstance(self.max_ratio, (int, float)) or not self.max_ratio > 1:
            raise ValueError(f"max_ratio must be a number > 1, got {self.max_ratio!r}")

    def evaluates_at(self, slices: int) -> bool:
        return self.metric.startswith("eval_")

    def on_boundary(self, view: BoundaryView) -> list[Op]:
        run = view.runs[view.run]
        start, self.seen[run.name] = self.seen.get(run.name, 0), len(run.history)
        if not run.active:
            return []
        _check_logged(view, self.metric, f"at chunk {run.slices} of {run.name}")
        first = next((entry[self.metric] for entry in run.history if self.metric in entry), None)
        for entry in run.history[start:]:
            value, grad_norm = entry.get(self.metric), entry.get("grad_norm")
            if value is not None and not math.isfinite(value):
                why = f"{self.metric} is {value}"
            elif grad_norm is not None and not math.isfinite(grad_norm):
                why = f"grad_norm is {grad_norm}"
            elif value is not None and first is not None and 0 < first < math.inf and value > self.max_ratio * first:
                why = f"{self.metric} {value:.6g} > {self.max_ratio:g} x first {first:.6g}"
            else:
                continue
            reason = f"failed by DivergenceGuard at step {run.global_step}: {why}"
            return [Op("fail", run.name, source=type(self).__name__, reason=reason)]
        return []


@dataclass
class Explore:
    """Population-based exploration: replace the worst runs with perturbed, warm-started clones of the best.

    Every `interval` slices, the `top` worst active runs are stopped, and each is replaced by a clone of one of the
    `top` best runs (best first), warm-started from its adapter and optimizer state, with every field of `perturb`
    multiplied by a factor drawn from its tuple; the clone's step budget is what its parent has left, so it ends with
    the others. The draws use `seed`, so a rerun makes the same choices.

    Runs are ranked as in [`SuccessiveHalving`]: one without a value ranks last (it is replaced first), and a metric
    never logged at all, or NaN for every run, raises `MetricError` (recorded once in the ledger, and the policy is
    disabled).

    Args:
        top (`float` or `int`, *optional*, defaults to `0.25`): How many runs to replace: a fraction of the active
            runs (< 1, at least one) or a count.
        perturb (`dict[str, tuple[float, ...]]`, *optional*): Factors per numeric training argument a run may
            override (the trainer's `per_run_fields`; checked when the trainer is built), defaults to
            `{"learning_rate": (0.8, 1.25)}`. Not `max_steps`: a clone gets its parent's remaining steps.
        metric (`str`, *optional*, defaults to `"eval_loss"`): The logged value to compare.
        mode (`str`, *optional*, defaults to `"min"`): `"min"` or `"max"`.
        interval (`int`, *optional*, defaults to `2`): Slices between two explorations.
        seed (`int`, *optional*, defaults to `0`): Seed of the perturbation draws.
    """

    top: float = 0.25
    perturb: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"learning_rate": (0.8, 1.25)})
    metric: str = "eval_loss"
    mode: str = "min"
    interval: int = 2
    seed: int = 0
    checked: int = field(default=0, init=False)

    def __post_init__(self):
        _check_metric(self.metric)
        _check_mode(self.mode)
        count_ok = isinstance(self.top, int) and self.top >= 1
        if not count_ok and not (isinstance(self.top, float) and 0 < self.top < 1):
            raise ValueError(f"top must be a fraction in (0, 1) or a count >= 1, got {self.top!r}")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.perturb, dict):
            raise ValueError(f"perturb must be a dict of field -> factors, got {self.perturb!r}")
        for key, factors in self.perturb.items():
            if not isinstance(key, str) or key == "max_steps":
                raise ValueError(
                    f"perturb key {key!r} is invalid; use a training argument such as 'learning_rate' (a clone's "
                    "max_steps is its parent's remaining steps)"
                )
            if not factors or not all(isinstance(f, (int, float)) and f > 0 for f in factors):
                raise ValueError(f"perturb[{key!r}] must be a non-empty tuple of positive factors, got {factors!r}")
        self._random = random.Random(self.seed)

    def evaluates_at(self, slices: int) -> bool:
        return slices % self.interval == 0

    def check_trainer(self, trainer: Any) -> None:
        """Refuse `perturb` keys that a clone of `trainer`'s runs cannot take (they differ between SFT, DPO, GRPO)."""
        from .configs import _suggest  # here, not at the top: this module stays light (it imports no transformers)

        args = trainer.args
        numeric = sorted(
            key
            for key in trainer.per_run_fields
            if isinstance(getattr(args, key, None), (int, float)) and not isinstance(getattr(args, key), bool)
        )
        for key in sorted(self.perturb):
            if key not in trainer.per_run_fields or not hasattr(args, key):
                raise ValueError(
                    f"perturb key {key!r} is not a field a {type(trainer).__name__} run can override"
                    f"{_suggest(key, numeric)}"
                )
            if key not in numeric:
                kind = type(getattr(args, key)).__name__
                raise ValueError(
                    f"perturb key {key!r}: its value is multiplied, but args.{key} is a {kind}, not a number"
                )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the last chunk explored and the draws' generator."""
        version, keys, gauss = self._random.getstate()
        return {"checked": self.checked, "random": [version, list(keys), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, keys, gauss = state["random"]
        self.checked = state["checked"]
        self._random.setstate((version, tuple(keys), gauss))

    def on_boundary(self, view: BoundaryView) -> list[Op]:
        if view.frontier % self.interval or view.frontier <= self.checked:
            return []
        self.checked = view.frontier
        ranked = _rank(view, view.active(), self.metric, self.mode, f"at chunk {view.frontier}")
        if ranked is None:
            return []  # nothing logged yet: explore at the next interval
        count = self.top if isinstance(self.top, int) else max(1, int(len(ranked) * self.top))
        count = min(count, len(ranked) // 2)
        ops: list[Op] = []
        for (worst_value, worst), (best_value, best) in zip(reversed(ranked[-count:]), ranked[:count]):
            remaining = best.max_steps - best.global_step
            if remaining < 1:
                continue
            overrides: dict[str, Any] = {"max_steps": remaining}
            for key, factors in sorted(self.perturb.items()):
                value = getattr(best.args, key) * self._random.choice(factors)
                overrides[key] = max(1, round(value)) if isinstance(getattr(best.args, key), int) else value
            source, chunk = type(self).__name__, view.frontier
            why = f"{self.metric} {worst_value:.6g} vs {best.name} {best_value:.6g}"
            ops.append(Op("stop", worst.name, source=source, reason=f"replaced by Explore at chunk {chunk}: {why}"))
            reason = f"Explore at chunk {chunk}: replaces {worst.name}, perturbed {overrides}"
            ops.append(Op("clone", best.name, overrides, True, True, source=source, reason=reason))
        return ops
