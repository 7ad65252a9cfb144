"""The ledger: the append-only `ledger.jsonl`, each run's `run.json`, the leaderboard and the callback that feeds them.

`<output_dir>/ledger.jsonl` gets one JSON object per line for every log event and every status change, written as
it happens (so the file shows the real order in which runs trained) and flushed at once (so it survives a crash).
Every line has `time`, `run`, `step`, `chunk` and `event`; log lines carry the logged values.

transformers is imported only when the trainer asks for `LogEventsCallback`, so the ledger and leaderboard helpers
(all the `rf-callbacks` command needs) load in milliseconds rather than the seconds torch takes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import Run


class Ledger:
    """Append-only JSONL file, safe to write from several threads.

    Args:
        path (`str` or `os.PathLike`): The file; created with its folder if missing, appended to if present.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._lock = threading.Lock()

    # Opened per record (one event per logged step: the open is noise next to a step) so that no file handle stays
    # open between records, even when a script never calls `trainer.close()`.
    def write(self, run: str | None, step: int, chunk: int | None, event: str, **values: Any) -> None:
        record = {"time": round(time.time(), 6), "run": run, "step": step, "chunk": chunk, "event": event, **values}
        line = json.dumps(record, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def sync(self) -> None:
        """Make every record written so far durable (fsync acts on the file, whichever handle wrote it)."""
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            os.fsync(handle.fileno())

    def close(self) -> None:
        """Nothing stays open between records; kept so owners can close what they opened."""


def iter_ledger(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every well-formed record of a ledger, in order: a line cut short by a crash (or garbled bytes) is skipped."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def read_ledger(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every well-formed record of a ledger, in order, as a list (see [`iter_ledger`])."""
    return list(iter_ledger(path))


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file. The temporary name
    is the writer's own (process and thread), so two threads writing the same file never clash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_run_json(run: Run, directory: str | os.PathLike) -> None:
    write_json_atomic(Path(directory) / "run.json", run.result())


def __getattr__(name: str) -> Any:
    if name != "LogEventsCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    class LogEventsCallback(TrainerCallback):
        """Hands every `Trainer.log` call to `on_log` (the trainer knows which run and chunk it belongs to)."""

        def __init__(self, on_log):
            self.on_log_event = on_log

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.on_log_event(logs)

    LogEventsCallback.__qualname__ = LogEventsCallback.__name__
    globals()[name] = LogEventsCallback
    return LogEventsCallback


_HIDDEN_CONFIG_KEYS = ("peft_type", "use_dora", "use_rslora")


def format_leaderboard(
    results: list[dict[str, Any]], metric: str = "eval_loss", greater_is_better: bool = False
) -> str:
    """A plain-text table of `results()` rows, best `metric` first (lower is better unless `greater_is_better`;
    missing values last)."""

    def key(row):
        value = row.get(metric)
        if value is not None and greater_is_better:
            value = -value
        return (value is None, value if value is not None else 0.0, row["name"])

    columns = ["rank", "run", "status", "step", "train_loss", metric, "chunks", "time_s", "config"]
    lines = []
    for rank, row in enumerate(sorted(results, key=key), start=1):
        config = ", ".join(
            f"{k}={v}" for k, v in row["config"].items() if k not in ("peft_type", "use_dora", "use_rslora")
        )
        lines.append(
            [
                str(rank),
                row["name"],
                row["status"],
                f"{row['global_step']}/{row['max_steps']}",
                _fmt(row.get("train_loss")),
                _fmt(row.get(metric)),
                str(row["chunks_done"]),
                f"{row['wall_time']:.1f}",
                config,
            ]
        )
    widths = [max(len(column), *(len(line[i]) for line in lines)) for i, column in enumerate(columns)]
    render = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([render(columns), render(["-" * width for width in widths]), *map(render, lines)])


def results_from_dir(output_dir: str | os.PathLike, metric: str = "eval_loss") -> list[dict[str, Any]]:
    """`results()` rows of an experiment rebuilt from its folder, so they are there after the process ended or crashed.

    Each run starts from its row in `experiment.json` (written when training starts), then its `run.json` (written at
    each status change), then its ledger lines, the most recent record: the last status, step and chunk count, the
    last logged `loss` and `metric` (a ledger key such as `eval_loss` or `eval_mean_token_accuracy`).

    Raises:
        `FileNotFoundError`: If `<output_dir>/ledger.jsonl` does not exist.
    """
    output_dir = Path(output_dir)
    records = read_ledger(output_dir / "ledger.jsonl")
    rows: dict[str, dict[str, Any]] = {}
    experiment = output_dir / "experiment.json"
    if experiment.exists():
        for row in json.loads(experiment.read_text(encoding="utf-8")).get("runs", []):
            rows[row["name"]] = row
    for path in sorted(output_dir.glob("runs/*/run.json")):
        row = json.loads(path.read_text(encoding="utf-8"))
        rows[row["name"]] = {**rows.get(row["name"], {}), **row}
    boundaries: dict[str, int] = {}
    for record in records:
        name = record.get("run")
        if not isinstance(name, str) or str(record.get("event", "")).startswith("op"):
            continue  # op records name whatever run was asked for, and carry no step
        row = rows.setdefault(name, {"name": name})
        row["global_step"] = record.get("step", row.get("global_step", 0))
        if record.get("event") == "status":
            row["status"], row["error"] = record.get("status"), record.get("error")
            row["reason"] = record.get("reason")
        elif record.get("event") == "boundary":
            boundaries[name] = boundaries.get(name, 0) + 1
        elif record.get("event") == "log":
            # As in `results()`, `train_loss` is the last logged `loss` (unless `metric` asks for the final average).
            for key, column in (("loss", "train_loss"), (metric, metric)):
                if record.get(key) is not None:
                    row[column] = record[key]
    for name, row in rows.items():
        done = boundaries.get(name, 0) + (row.get("status") == "completed")
        row["chunks_done"] = max(row.get("chunks_done", 0), done)
        for key, default in (("status", "pending"), ("global_step", 0), ("max_steps", "?"), ("wall_time", 0.0)):
            row.setdefault(key, default)
        row.setdefault("config", {})
    return list(rows.values())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
