"""Plot the metrics of an experiment's append-only ledger (`ledger.jsonl`) to a PNG.

Each ledger line is one JSON object with at least `run`, `step` and `event`. `"event": "log"` lines carry metrics
(`loss`, `eval_loss`, `learning_rate`, ...); `"event": "boundary"` lines mark the step where a run ended a chunk and
moved on to the next one (a run's end is no boundary: it gets a `"status"` line). Lines that are not JSON objects, lack
a run or a step, or have other events are skipped, so a ledger cut mid-line by a crash still plots.

matplotlib is imported inside [`ledger_figure`] and [`plot_ledger`], so importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ledger import iter_ledger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Events that place a run on the plot (`status` only fixes its color, by first appearance); anything else in the
# ledger (ops, ...) is someone else's business.
_KNOWN_EVENTS = {"log", "boundary", "status"}
# Fields every ledger line has (and `epoch_index` on logs): not metrics.
_RECORD_FIELDS = {"time", "run", "step", "chunk", "event", "epoch_index"}


def ledger_key(metric: str) -> str:
    """The ledger's key for a metric named either way: `eval/loss` -> `eval_loss`, `train/loss` -> `loss`,
    `test/accuracy` -> `test_accuracy`; ledger keys (`eval_loss`, `loss`) are returned as they are."""
    prefix, slash, name = metric.partition("/")
    if not slash:
        return metric
    return name if prefix == "train" else f"{prefix}_{name}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_ledger(
    ledger_path: Path, metrics: Sequence[str]
) -> tuple[dict[str, dict[str, dict[float, float]]], dict[str, list[float]], list[str]]:
    """Return `(metric -> run -> {step: value}, run -> boundary steps, runs in order of first appearance)`."""
    series: dict[str, dict[str, dict[float, float]]] = {metric: {} for metric in metrics}
    boundaries: dict[str, list[float]] = {}
    runs: list[str] = []
    for record in iter_ledger(ledger_path):
        if record.get("event") not in _KNOWN_EVENTS:
            continue
        run, step = record.get("run"), record.get("step")
        if not isinstance(run, str) or not _is_number(step):
            continue
        if run not in boundaries:
            runs.append(run)
            boundaries[run] = []
        # The trainer writes the boundary at the step the chunk ended, and none at a run's end; guessing it from
        # a change in the `chunk` of logs would be up to `logging_steps` late and could mark the run's end too.
        if record["event"] == "boundary":
            boundaries[run].append(step)
        if record["event"] != "log":
            continue
        for metric in metrics:
            value = record.get(metric)
            # Non-finite values (a diverged run) would wreck the axis limits; the run's failure shows in status.
            if _is_number(value) and math.isfinite(value):
                # A run resumed from a checkpoint logs some steps again; the later value wins.
                series[metric].setdefault(run, {})[step] = float(value)
    return series, boundaries, runs


def ledger_figure(
    ledger_path: str | os.PathLike, metrics: Sequence[str] = ("loss", "eval_loss"), title: str | None = None
) -> Figure:
    """
    Draw one subplot per metric with one line per run against the training step (what [`plot_ledger`] saves).

    Chunk boundaries (the ledger's `"boundary"` events) are drawn as light dotted vertical lines in the run's color;
    a run's end is not one. A metric with no value in the ledger gets no subplot.

    Args:
        ledger_path (`str` or `os.PathLike`):
            Path of the JSONL ledger.
        metrics (`Sequence[str]`, *optional*, defaults to `("loss", "eval_loss")`):
            Keys of `"log"` events to plot, one subplot each, in this order; transformers' names (`train/loss`,
            `eval/loss`) are accepted too, and label their subplot.
        title (`str`, *optional*):
            Figure title. Defaults to the ledger's file name.

    Returns:
        `matplotlib.figure.Figure`: The figure, on an Agg canvas (not registered with pyplot).

    Raises:
        `ValueError`: If `metrics` is empty or the ledger holds no value for any of them.
    """
    # The object-oriented Agg canvas renders without a display and, unlike `matplotlib.use("Agg")` + pyplot, neither
    # switches the caller's backend (a notebook's inline plots) nor keeps figures alive in pyplot's global registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ledger_path = Path(ledger_path)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one ledger field, got an empty sequence")
    keys = {metric: ledger_key(metric) for metric in metrics}
    series, boundaries, runs = _read_ledger(ledger_path, list(keys.values()))
    plotted = [metric for metric in metrics if series[keys[metric]]]
    if not plotted:
        raise ValueError(
            f"ledger {str(ledger_path)!r} has no values for any of the metrics {metrics}; it has "
            f"{', '.join(ledger_metrics(ledger_path)) or 'none'}"
        )

    fig = Figure(figsize=(8, 3 * len(plotted)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plotted), 1, sharex=True, squeeze=False)[:, 0]
    # A run keeps its color across subplots, assigned by first appearance in the ledger.
    palette = [f"C{i % 10}" for i in range(len(runs))]
    colors = dict(zip(runs, palette, strict=True))
    for ax, metric in zip(axes, plotted, strict=True):
        for run in runs:
            points = series[keys[metric]].get(run)
            if not points:
                continue
            steps = sorted(points)
            # Markers keep short series (a single eval point) visible; on long ones they would only add clutter.
            marker = "." if len(steps) < 20 else None
            ax.plot(steps, [points[s] for s in steps], color=colors[run], label=run, marker=marker)
            for step in sorted(set(boundaries[run])):
                ax.axvline(step, color=colors[run], linestyle=":", linewidth=0.8, alpha=0.4)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.2)
        ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("step")
    fig.suptitle(title if title is not None else ledger_path.name)
    return fig


def plot_ledger(
    ledger_path: str | os.PathLike,
    output_png: str | os.PathLike,
    metrics: Sequence[str] = ("loss", "eval_loss"),
    title: str | None = None,
) -> Path:
    """
    Draw the ledger with [`ledger_figure`] (one subplot per metric, one line per run, dotted chunk boundaries) and
    save it as a PNG.

    Args:
        ledger_path (`str` or `os.PathLike`):
            Path of the JSONL ledger.
        output_png (`str` or `os.PathLike`):
            Where to write the PNG; missing parent folders are created and an existing file is replaced atomically,
            so a dashboard serving it never reads half a file.
        metrics (`Sequence[str]`, *optional*, defaults to `("loss", "eval_loss")`), title (`str`, *optional*):
            As in [`ledger_figure`].

    Returns:
        `pathlib.Path`: The path of the written PNG.

    Raises:
        `ValueError`: If `metrics` is empty or the ledger holds no value for any of them.
    """
    fig = ledger_figure(ledger_path, metrics, title)
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output_png.name}.", suffix=".tmp", dir=output_png.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, output_png)
    except BaseException:
        os.unlink(tmp)
        raise
    return output_png


def ledger_metrics(ledger_path: str | os.PathLike) -> list[str]:
    """The numeric keys of a ledger's `"log"` events (`loss`, `eval_loss`, ...), in order of first appearance."""
    seen: dict[str, None] = {}
    for record in iter_ledger(ledger_path):
        if record.get("event") == "log":
            seen.update(
                (key, None) for key, value in record.items() if key not in _RECORD_FIELDS and _is_number(value)
            )
    return list(seen)
