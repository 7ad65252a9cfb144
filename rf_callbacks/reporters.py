"""Reporters: per-run tracking sinks fed from the same events as the ledger.

transformers' integration callbacks assume one tracking run per process (its MLflow callback opens a new auto-named
run at every `train()`), so with rf-callbacks each backend named in `report_to` is driven through its own client API
instead, with one tracking run per rf run. A reporter is any object with the `Reporter` methods below.

MLflow: one experiment per trainer (`MLFLOW_EXPERIMENT_NAME`, else `args.run_name`, else the output folder's name),
one MLflow run per rf run, named after it, with the run's flattened config as params, every logged value under HF's
`train/` and `eval/` names at the run's global step, plus `chunk`; the status is mirrored when the run ends. The
store is `MLFLOW_TRACKING_URI` when set, else the sqlite file `<output_dir>/mlflow.db`
(`mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db` shows it).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .run import Run

_MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED", "deleted": "KILLED"}


class Reporter(Protocol):
    """A sink for one experiment's runs."""

    def start(self, run: Run) -> None: ...

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None: ...

    def finish(self, run: Run) -> None: ...

    def close(self) -> None: ...


def hf_metric_names(values: dict[str, Any]) -> dict[str, float]:
    """`loss` -> `train/loss`, `eval_loss` -> `eval/loss`, as transformers' integrations name them; numbers only."""
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key.startswith("eval_"):
            metrics[f"eval/{key[5:]}"] = float(value)
        elif key.startswith("test_"):
            metrics[f"test/{key[5:]}"] = float(value)
        else:
            metrics[f"train/{key}"] = float(value)
    return metrics


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat


class MlflowReporter:
    """One MLflow run per rf run, through `MlflowClient` with explicit run ids (no process-global active run).

    Args:
        tracking_uri (`str`): Where to write, e.g. `sqlite:///out/mlflow.db`.
        experiment_name (`str`): The MLflow experiment that groups the runs.
    """

    def __init__(self, tracking_uri: str, experiment_name: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(experiment_name)
        else:
            self.experiment_id = experiment.experiment_id
        self.run_ids: dict[str, str] = {}

    @classmethod
    def from_env(cls, output_dir: str | os.PathLike, run_name: str | None) -> MlflowReporter:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run_name or Path(output_dir).resolve().name
        return cls(uri, name)

    def start(self, run: Run) -> None:
        tags = {"rf.run": run.name, "rf.parent": str(run.spec.parent)}
        created = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags)
        self.run_ids[run.name] = created.info.run_id
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten(run.spec.summary).items()]
        params.append(Param("parent", str(run.spec.parent)))
        self.client.log_batch(created.info.run_id, params=params)

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if run.name not in self.run_ids:
            self.start(run)
        stamp = int(time.time() * 1000)
        metrics = {**hf_metric_names(values), "chunk": float(chunk)}
        batch = [Metric(key, value, stamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_ids[run.name], metrics=batch)

    def finish(self, run: Run) -> None:
        run_id = self.run_ids.get(run.name)
        if run_id is None:
            return
        if run.error:
            self.client.set_tag(run_id, "rf.error", run.error[:5000])
        self.client.set_terminated(run_id, status=_MLFLOW_STATUS.get(run.status, "FINISHED"))

    def close(self) -> None:
        return None
