"""Plot the metrics of an experiment's append-only ledger (`ledger.jsonl`) to a PNG.

Each ledger line is one JSON object with at least `run`, `step` and `event`. `"event": "log"` lines carry metrics
(`loss`, `eval_loss`, `learning_rate`, ...); other lines (`"status"`, ops) only matter for their `chunk` field, whose
increase marks a chunk boundary. Lines that are not JSON objects, lack a run or a step, or have unknown events are
skipped, so a ledger cut mid-line by a crash still plots.

matplotlib is imported inside [`plot_ledger`], so importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Events whose `chunk` field is trusted for boundaries; anything else in the ledger is someone else's business.
_KNOWN_EVENTS = {"log", "status"}
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
    last_chunk: dict[str, float] = {}
    runs: list[str] = []
    with open(ledger_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("event") not in _KNOWN_EVENTS:
                continue
            run, step = record.get("run"), record.get("step")
            if not isinstance(run, str) or not _is_number(step):
                continue
            if run not in boundaries:
                runs.append(run)
                boundaries[run] = []
            chunk = record.get("chunk")
            if _is_number(chunk):
                # Any change counts: chunks increase within an epoch and wrap back to 0 at the next one.
                if run in last_chunk and chunk != last_chunk[run]:
                    boundaries[run].append(step)
                last_chunk[run] = chunk
            if record["event"] != "log":
                continue
            for metric in metrics:
                value = record.get(metric)
                # Non-finite values (a diverged run) would wreck the axis limits; the run's failure shows in status.
                if _is_number(value) and math.isfinite(value):
                    # A run resumed from a checkpoint logs some steps again; the later value wins.
                    series[metric].setdefault(run, {})[step] = float(value)
    return series, boundaries, runs


def plot_ledger(
    ledger_path: str | os.PathLike,
    output_png: str | os.PathLike,
    metrics: Sequence[str] = ("loss", "eval_loss"),
    title: str | None = None,
) -> Path:
    """
    Draw one subplot per metric with one line per run against the training step, and save it as a PNG.

    Chunk boundaries (the steps where a run's `chunk` changes) are drawn as light dotted vertical lines in the
    run's color. A metric with no value in the ledger gets no subplot.

    Args:
        ledger_path (`str` or `os.PathLike`):
            Path of the JSONL ledger.
        output_png (`str` or `os.PathLike`):
            Where to write the PNG; missing parent folders are created and an existing file is replaced atomically,
            so a dashboard serving it never reads half a file.
        metrics (`Sequence[str]`, *optional*, defaults to `("loss", "eval_loss")`):
            Keys of `"log"` events to plot, one subplot each, in this order; transformers' names (`train/loss`,
            `eval/loss`) are accepted too, and label their subplot.
        title (`str`, *optional*):
            Figure title. Defaults to the ledger's file name.

    Returns:
        `pathlib.Path`: The path of the written PNG.

    Raises:
        `ValueError`: If `metrics` is empty or the ledger holds no value for any of them.
    """
    # The object-oriented Agg canvas renders without a display and, unlike `matplotlib.use("Agg")` + pyplot, neither
    # switches the caller's backend (a notebook's inline plots) nor keeps figures alive in pyplot's global registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ledger_path, output_png = Path(ledger_path), Path(output_png)
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
    with open(ledger_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "log":
                seen.update(
                    (key, None) for key, value in record.items() if key not in _RECORD_FIELDS and _is_number(value)
                )
    return list(seen)
