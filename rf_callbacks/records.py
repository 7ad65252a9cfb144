"""What a multi-run trainer writes while it trains: the ledger, `experiment.json`, each run's `run.json`, and the
per-run tracking backends named in `report_to` (MLflow, TensorBoard, W&B, Trackio).

`Records` owns all of it, with one `is_main`: with several processes only rank 0 writes; another rank buffers the
ledger records of the runs it trains (`BufferLedger`) and rank 0 replays them (`Records.replay`) at the round's end.
The rest of the engine talks to it through `write` (a ledger event), `log` (a run's metrics), `status` (a run's
status change) and the checkpoint calls (`flush`, `state_dict`, `load_state_dict`, `truncate`).

transformers' own integration callbacks assume one run per process; the backends rf-callbacks drives are claimed from
them (one tracking run per rf run, see `reporters.py`), and any other integration is disabled when several runs
share the process, so runs never mix (`RecordsMixin._claim_reporting`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from .ledger import Ledger, write_json_atomic, write_run_json
from .reporters import REPORTERS, Reporter, check_backends, make_reporters

if TYPE_CHECKING:
    from .run import Run

ENDED = ("completed", "failed", "stopped", "deleted")


class Deferred:
    """Holds a reporter's calls until `flush()`, which the trainer calls as it writes each checkpoint: a tracker
    then shows exactly what a resumed experiment keeps (the steps after the last checkpoint are logged once, after
    the resume, not twice).

    Calls still held when the trainer is closed after an interrupted `train()` (an exception, Ctrl-C) are sent
    then (`send()`), and the trainer records how many `log` calls of each run went out after the checkpoint
    (`reported()`, next to it); a resume from that checkpoint drops that many of each run's first `log` calls
    (`skip`), so the backend gets each step once either way.

    Args:
        reporter ([`Reporter`]): The backend's reporter.
    """

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.calls: list[tuple[str, Any, tuple]] = []
        self.hold = False  # outside `train()` calls go through at once
        self.sent: dict[str, int] = {}  # per run: held `log` calls sent since the last checkpoint (or skipped)
        self.skip: dict[str, int] = {}  # per run: `log` calls to drop, sent by an interrupted run of the experiment

    def _call(self, method: str, run: Run, *args: Any) -> None:
        if method == "log" and self.skip.get(run.name):
            self.skip[run.name] -= 1
            self.sent[run.name] = self.sent.get(run.name, 0) + 1
        elif self.hold:
            self.calls.append((method, self._frozen(run), args))
        else:
            getattr(self.reporter, method)(run, *args)

    @staticmethod
    def _frozen(run: Run) -> SimpleNamespace:  # the run as it is now, not as it will be at the flush
        return SimpleNamespace(
            name=run.name, status=run.status, error=run.error, reason=run.reason, spec=run.spec,
            global_step=run.global_step,
        )  # fmt: skip

    def start(self, run: Run) -> None:
        self._call("start", run)

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None:
        self._call("log", run, step, chunk, dict(values))

    def finish(self, run: Run) -> None:
        self._call("finish", run)

    def send(self) -> None:
        """Send the held calls now, between checkpoints (counted in `sent`)."""
        calls, self.calls = self.calls, []
        for method, run, args in calls:
            getattr(self.reporter, method)(run, *args)
            if method == "log":
                self.sent[run.name] = self.sent.get(run.name, 0) + 1

    def reported(self) -> dict[str, int]:
        """Per run, the `log` calls the backend has got since the last checkpoint (sent, or skipped because an
        earlier process had sent them)."""
        names = set(self.sent) | set(self.skip)
        counts = {name: self.sent.get(name, 0) + self.skip.get(name, 0) for name in sorted(names)}
        return {name: count for name, count in counts.items() if count}

    def flush(self) -> None:
        """Send the held calls: a checkpoint is being written, and it keeps everything sent so far."""
        calls, self.calls = self.calls, []
        for method, run, args in calls:
            getattr(self.reporter, method)(run, *args)
        self.sent.clear()
        self.skip.clear()
        self.reporter.flush()

    def close(self) -> None:
        self.send()
        self.reporter.flush()
        self.reporter.close()

    def state_dict(self) -> dict[str, Any]:
        return self.reporter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reporter.load_state_dict(state)


class BufferLedger:
    """The ledger of a rank other than 0: it keeps the records written while this rank trains its runs (they go to
    rank 0 at the end of the round) and drops the rest (rank 0 writes those itself)."""

    path = None

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.recording = False

    def write(self, run, step, chunk, event, **values) -> None:
        if self.recording:  # with the time it happened (rank 0 writes it later)
            self.records.append((run, step, chunk, event, {"time": round(time.time(), 6), **values}))

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class Records:
    """The experiment's records in `output_dir`, opened lazily (an op submitted before `train()` is recorded too).

    Args:
        output_dir (`Path`): where the ledger, `experiment.json` and the tracking stores go.
        report_to (`list[str]`): the claimed `report_to` backends, one tracking run per rf run.
        run_name (`str` or `None`): the shared arguments' `run_name` (the tracking experiment's name).
        deferred (`bool`): reporters take only what a checkpoint has kept (checkpoints are on), see `Deferred`.
        is_main (`bool`): this process writes (one process, or rank 0 of several).
        info (`Callable[[], dict]`): the current `experiment.json` content.
    """

    def __init__(
        self,
        output_dir: Path,
        report_to: list[str],
        run_name: str | None,
        deferred: bool,
        is_main: bool,
        info: Callable[[], dict[str, Any]],
    ):
        self.output_dir, self.is_main, self.info = output_dir, is_main, info
        self._report_to, self._run_name, self._deferred = report_to, run_name, deferred
        self.ledger: Ledger | BufferLedger | None = None if is_main else BufferLedger()
        self.reporters: list[Reporter] = []
        self.started = False  # opened once: the trainer has begun its experiment

    # ------------------------------------------------------------------------------------------ writing
    def open(self, resuming: bool = False) -> None:
        """Open the ledger (a previous experiment's is kept under a dated name unless `resuming`) and, the first
        time, the reporters; write `experiment.json`."""
        if not self.is_main:
            self.started = True
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.ledger is None:
            path = self.output_dir / "ledger.jsonl"
            first = not self.started
            if first and path.exists() and not resuming:
                path.rename(path.with_name(f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
            self.ledger = Ledger(path)
            if first:
                self.reporters = make_reporters(self._report_to, self.output_dir, self._run_name)
                if self._deferred:
                    self.reporters = [Deferred(reporter) for reporter in self.reporters]
            self.started = True
        self.write_info()

    def write_info(self) -> None:
        if self.is_main:
            write_json_atomic(self.output_dir / "experiment.json", self.info())

    def write(self, run: str | None, step: int | None, chunk: int | None, event: str, **values: Any) -> None:
        """One ledger event (opening the experiment first if it is not yet)."""
        if self.ledger is None:
            self.open()
        if self.ledger is not None:  # (None: closed on a rank other than 0)
            self.ledger.write(run, step, chunk, event, **values)

    def log(self, run: Run, step: int, chunk: int, epoch: int, logs: dict[str, Any]) -> None:
        """A run's logged metrics, to the ledger and every reporter (ignored before the experiment is open)."""
        if self.ledger is None:
            return
        self.ledger.write(run.name, step, chunk, "log", epoch_index=epoch, **logs)
        for reporter in self.reporters:
            reporter.log(run, step, chunk, logs)

    def status(self, run: Run, **extra: Any) -> None:
        """A run's status changed: the ledger event, its tracking run started or ended, its `run.json`."""
        self.write(run.name, run.global_step, run.current_chunk, "status", status=run.status, **extra)
        self._report_status(run, run.status)
        if self.is_main and run.args.should_save:
            write_run_json(run, run.args.output_dir)

    def _report_status(self, run: Run, status: str | None) -> None:
        for reporter in self.reporters:
            if status == "running":
                reporter.start(run)
            elif status in ENDED:
                reporter.finish(run)

    def replay(self, rank: int, records: list[tuple], runs: dict[str, Run]) -> None:
        """Rank 0 writes another rank's ledger records, and sends its logs and status changes to the reporters."""
        for name, step, chunk, event, values in records:
            self.ledger.write(name, step, chunk, event, rank=rank, **values)
            run = runs.get(name)
            if run is None:
                continue
            if event == "log":
                logs = {k: v for k, v in values.items() if k != "epoch_index"}
                for reporter in self.reporters:
                    reporter.log(run, step, chunk, logs)
            elif event == "status":
                self._report_status(run, values.get("status"))
                write_run_json(run, run.args.output_dir)

    def recording(self, on: bool) -> None:
        """A rank other than 0 keeps what it writes while it trains its runs (see `BufferLedger`)."""
        if isinstance(self.ledger, BufferLedger):
            self.ledger.recording = on

    def take_buffered(self) -> list[tuple]:
        """The records a rank other than 0 kept this round (empty on rank 0), handed over once."""
        if not isinstance(self.ledger, BufferLedger):
            return []
        records, self.ledger.records = self.ledger.records, []
        return records

    # ------------------------------------------------------------------------------------------ checkpoints
    def hold(self, hold: bool) -> None:
        """While `train()` runs with checkpoints on, reporters take what a checkpoint has kept (see `Deferred`)."""
        for reporter in self.reporters:
            if isinstance(reporter, Deferred):
                if not hold:
                    reporter.flush()
                reporter.hold = hold

    def sync(self) -> None:
        if self.ledger is not None:
            self.ledger.sync()

    def flush(self) -> int:
        """A checkpoint is written: reporters send what they held, the ledger reaches the disk. Returns its size."""
        for reporter in self.reporters:
            reporter.flush()
        self.ledger.sync()
        return self.ledger.path.stat().st_size

    def state_dict(self) -> list[dict[str, Any]]:
        return [reporter.state_dict() for reporter in self.reporters]

    def load_state_dict(self, states: list[dict[str, Any]], reported: list[dict[str, int]] | None) -> None:
        """Reporters as of a checkpoint; `reported`: per reporter, the logs an interrupted process already sent."""
        for reporter, state in zip(self.reporters, states):
            reporter.load_state_dict(state)
        for reporter, counts in zip(self.reporters, reported or []):
            if isinstance(reporter, Deferred):
                reporter.skip = dict(counts)

    def truncate(self, size: int) -> None:
        """Drop what the ledger holds past `size` bytes (a resume writes it again)."""
        with open(self.output_dir / "ledger.jsonl", "r+b") as handle:
            handle.truncate(size)

    def send_held(self) -> list[dict[str, int]]:
        """Send what the reporters still hold (after an interrupted `train()`); per reporter, the logs sent."""
        sent = []
        for reporter in self.reporters:
            if isinstance(reporter, Deferred):
                reporter.send()
                sent.append(reporter.reported())
            else:
                sent.append({})
        return sent

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None


class RecordsMixin:
    """The trainer side of the records: the backends check, the claim on `report_to`, the log callback."""

    def __init__(self, *args: Any, **kwargs: Any):
        # Checked before the TRL trainer's `__init__` builds transformers' integration callbacks, whose error for a
        # missing library does not name the rf-callbacks extra that installs it.
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            check_backends(training_args.report_to or [])
        super().__init__(*args, **kwargs)

    def _claim_reporting(self, num_runs: int) -> list[str]:
        """Take over the `report_to` backends rf-callbacks drives per run; disable the rest when runs would mix."""
        names = [name for name in (self.args.report_to or []) if name != "none"]
        if names == ["all"]:
            names = get_available_reporting_integrations()
        claimed = [name for name in names if name in REPORTERS]
        for name in names:
            integration = INTEGRATION_TO_CALLBACK.get(name)
            if integration is None:
                continue
            if name in claimed:
                self.callback_handler.remove_callback(integration)
            elif num_runs > 1:
                warnings.warn(
                    f"report_to={name!r}: {integration.__name__} assumes one run per process and would mix all runs "
                    "into one tracking run; it is disabled. Every run's metrics are in <output_dir>/ledger.jsonl.",
                    stacklevel=3,
                )
                self.callback_handler.remove_callback(integration)
        return claimed

    def _experiment_info(self) -> dict[str, Any]:
        import peft
        import transformers
        import trl

        shared = self._rf_setup.args
        return {
            "trainer": type(self).__name__,
            "num_chunks": next(iter(self.coordinator)).plan.num_chunks,
            "seed": shared.seed,
            "data_seed": shared.data_seed,
            "train_sampling_strategy": shared.train_sampling_strategy,
            "runs": [run.result() for run in self.coordinator],
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "peft": peft.__version__,
            },
        }

    def _on_log(self, logs: dict[str, Any]) -> None:
        run = self.active_run
        if run is None:
            return
        step = self.state.global_step
        epoch, chunk = divmod(run.slice_of_step(step), run.plan.num_chunks)
        self._rf_records.log(run, step, chunk, epoch, logs)
