"""`TrackingMixin`: where a multi-run trainer's records go — the ledger, `experiment.json`, each run's `run.json`,
and the per-run tracking backends named in `report_to` (MLflow, TensorBoard, W&B, Trackio).

transformers' own integration callbacks assume one run per process; the backends rf-callbacks drives are claimed from
them (one tracking run per rf run, see `reporters.py`), and any other integration is disabled when several runs
share the process, so runs never mix.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from .reporters import REPORTERS, Deferred, check_backends, make_reporters
from .reporting import Ledger, write_json_atomic, write_run_json

if TYPE_CHECKING:
    from .run import Run


class TrackingMixin:
    """The records half of `MultiConfigMixin` (which sets `_rf_ledger`, `_rf_reporters` and `_rf_report_to`)."""

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

    def close(self) -> None:
        """Close the reporters' tracking runs and the ledger; call it when done with the trainer."""
        for reporter in self._rf_reporters:
            reporter.close()
        if self._rf_ledger is not None:
            self._rf_ledger.close()
            self._rf_ledger = None

    def _hold_reports(self, hold: bool) -> None:
        """While `train()` runs with checkpoints on, reporters take what a checkpoint has kept (see `Deferred`)."""
        for reporter in self._rf_reporters:
            if isinstance(reporter, Deferred):
                if not hold:
                    reporter.flush()
                reporter.hold = hold

    def _ledger(self) -> Ledger:
        if self._rf_ledger is None:
            self._open_experiment()
        return self._rf_ledger

    def _open_experiment(self, resuming: bool = False) -> None:
        coordination = getattr(self, "_rf_dist", None)
        if coordination is not None and not coordination.main:  # rank 0 keeps the records (see distributed.py)
            self._rf_started = True
            return
        self._rf_output_dir.mkdir(parents=True, exist_ok=True)
        if self._rf_ledger is None:
            path = self._rf_output_dir / "ledger.jsonl"
            first = not self._rf_started
            if first and path.exists() and not resuming:  # a previous experiment's ledger: keep, under its own name
                path.rename(path.with_name(f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
            self._rf_ledger = Ledger(path)
            if first:
                args = self._rf_shared_args
                deferred = self._rf_checkpoint_every is not None  # trackers show what a resume keeps
                self._rf_reporters = make_reporters(self._rf_report_to, self._rf_output_dir, args.run_name, deferred)
            self._rf_started = True
        write_json_atomic(self._rf_output_dir / "experiment.json", self._experiment_info())

    def _experiment_info(self) -> dict[str, Any]:
        import peft
        import transformers
        import trl

        shared = self._rf_shared_args
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
        run = self._rf_active
        if run is None or self._rf_ledger is None:
            return
        step = self.state.global_step
        epoch, chunk = divmod(run.slice_of_step(step), run.plan.num_chunks)
        self._rf_ledger.write(run.name, step, chunk, "log", epoch_index=epoch, **logs)
        for reporter in self._rf_reporters:
            reporter.log(run, step, chunk, logs)

    def _status_event(self, run: Run, **extra: Any) -> None:
        self._rf_ledger.write(run.name, run.global_step, run.current_chunk, "status", status=run.status, **extra)
        for reporter in self._rf_reporters:
            if run.status == "running":
                reporter.start(run)
            elif run.status in ("completed", "failed", "stopped", "deleted"):
                reporter.finish(run)
        coordination = getattr(self, "_rf_dist", None)
        if self.args.should_save if coordination is None else coordination.main:
            write_run_json(run, run.args.output_dir)
