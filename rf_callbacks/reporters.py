"""Reporters: per-run tracking sinks fed from the same events as the ledger.

transformers' integration callbacks assume one tracking run per process (its MLflow callback opens a new auto-named
run at every `train()`, `trackio.init()` finishes the previous run), so with rf-callbacks each backend named in
`report_to` is driven through its own client API instead, with one tracking run per rf run, and transformers' own
callback for it is removed. A reporter is any object with the `Reporter` methods below; `make_reporters` builds them
from `report_to` names.

Every backend gets, per rf run: a tracking run named after it, grouped with the experiment's other runs; its
params (the config summary, `parent`, `warm_start`); every logged value under HF's `train/` and `eval/` names at the
run's global step, plus `chunk`; its end status.

- `"mlflow"`: one experiment (`MLFLOW_EXPERIMENT_NAME`, else the experiment name) in `MLFLOW_TRACKING_URI`, else in
  the sqlite file `<output_dir>/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`), one
  MLflow run per rf run through `MlflowClient` with explicit run ids; status FINISHED, FAILED or KILLED.
- `"tensorboard"`: one log dir per run, `<root>/<run>`, with `root` = `TENSORBOARD_LOGGING_DIR`, else
  `<output_dir>/tensorboard` (`tensorboard --logdir <root>`); params and status as text summaries.
- `"wandb"`: one W&B run per rf run (`wandb.init(reinit="create_new")`), in project `WANDB_PROJECT` (else
  `"huggingface"`, as transformers), `group` = the experiment name, files under `WANDB_DIR`, else `<output_dir>`;
  finished with exit code 1 when the run failed.
- `"trackio"`: one Trackio run per rf run in project = the experiment name, in trackio's local store (`TRACKIO_DIR`,
  else `~/.cache/huggingface/trackio`; `trackio show --project <name>`).

Each reporter's `state_dict()` (its tracking run ids) goes into every experiment checkpoint, so a resumed experiment
continues the same tracking runs in every backend.

The experiment name is `args.run_name`, else the output folder's name.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger(__name__)

_MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED", "deleted": "KILLED"}


class Reporter(Protocol):
    """A sink for one experiment's runs."""

    def start(self, run: Run) -> None: ...

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None: ...

    def finish(self, run: Run) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to reattach a resumed experiment to the same tracking runs (JSON)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


def run_params(run: Run) -> dict[str, Any]:
    """What a tracking run records as its params: the config summary (PEFT fields and overrides), its parent (clones
    only, else `None`) and whether it was warm-started from it."""
    return {"parent": run.spec.parent, "warm_start": False, **run.spec.summary}


def experiment_name(output_dir: str | os.PathLike, run_name: str | None) -> str:
    """The name that groups one experiment's tracking runs: `args.run_name`, else the output folder's name."""
    return run_name or Path(output_dir).resolve().name


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
        return cls(uri, os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment_name(output_dir, run_name))

    def start(self, run: Run) -> None:
        if run.name in self.run_ids:  # resumed after a stop
            self.client.update_run(self.run_ids[run.name], status="RUNNING")
            return
        from mlflow.entities import Param

        tags = {"rf.run": run.name, "rf.parent": str(run.spec.parent)}
        created = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags)
        self.run_ids[run.name] = created.info.run_id
        params = [Param(key, value) for key, value in flatten(run_params(run)).items()]
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
        if run.reason:
            self.client.set_tag(run_id, "rf.reason", run.reason[:5000])
        self.client.set_terminated(run_id, status=_MLFLOW_STATUS.get(run.status, "FINISHED"))

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"run_ids": dict(self.run_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_ids.update(state.get("run_ids", {}))


class TensorBoardReporter:
    """One TensorBoard log dir per rf run, `<log_dir>/<run>`, each written by its own `SummaryWriter`.

    Args:
        log_dir (`str` or `os.PathLike`): The root folder; `tensorboard --logdir <log_dir>` shows all runs together.
    """

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self._summary_writer = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writers: dict[str, Any] = {}

    @classmethod
    def from_env(cls, output_dir: str | os.PathLike, run_name: str | None) -> TensorBoardReporter:
        root = os.environ.get("TENSORBOARD_LOGGING_DIR")
        return cls(os.path.expanduser(root) if root else Path(output_dir) / "tensorboard")

    def _writer(self, run: Run):
        # A log after the run finished (an `evaluate()` after `train()`) reopens its folder, in a new event file.
        if run.name not in self.writers:
            self.writers[run.name] = self._summary_writer(log_dir=str(self.log_dir / run.name))
        return self.writers[run.name]

    def start(self, run: Run) -> None:
        if run.name in self.writers:
            return
        rows = "\n".join(f"| {key} | {value} |" for key, value in flatten(run_params(run)).items())
        self._writer(run).add_text("params", f"| param | value |\n|---|---|\n{rows}")

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None:
        writer = self._writer(run)
        for key, value in {**hf_metric_names(values), "chunk": float(chunk)}.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # as transformers' TensorBoardCallback does at every log: live in the UI, safe from a crash

    def finish(self, run: Run) -> None:
        writer = self.writers.get(run.name)
        if writer is None:
            return
        why = run.error or run.reason
        writer.add_text("status", run.status + (f": {why}" if why else ""), run.global_step)
        if run.status == "stopped":  # it may be resumed
            writer.flush()
        else:
            self.writers.pop(run.name).close()

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()

    def state_dict(self) -> dict[str, Any]:
        return {}  # a resumed run writes a new event file in the same folder; TensorBoard shows them as one

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class _OneRunEach:
    """What the W&B and Trackio reporters share: one backend run object per rf run, finished once, and the backend
    run ids kept in experiment checkpoints so a resumed experiment reopens the same runs."""

    def __init__(self):
        self.runs: dict[str, Any] = {}
        self.finished: set[str] = set()
        self.run_ids: dict[str, str] = {}  # every backend run opened, by rf run (kept across a resume)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        for name, backend_run in self.runs.items():
            if name not in self.finished:
                backend_run.finish()
                self.finished.add(name)

    def state_dict(self) -> dict[str, Any]:
        return {"run_ids": dict(self.run_ids), "finished": sorted(self.finished)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_ids.update(state.get("run_ids", {}))
        self.finished.update(state.get("finished", []))


class WandbReporter(_OneRunEach):
    """One W&B run per rf run, opened with `wandb.init(reinit="create_new")` so several live in one process.

    The W&B run ids are kept in experiment checkpoints: a resumed experiment reopens each run with
    `wandb.init(id=<its id>, resume="allow")`, so it continues the same W&B run. Offline, wandb writes the resumed
    part to a new `offline-run-<time>-<id>` folder with the same run id; `wandb sync` uploads both into one run.

    Args:
        project (`str`): The W&B project.
        group (`str`): The W&B group that holds the experiment's runs.
        directory (`str` or `os.PathLike`): Where wandb writes its run folders (`<directory>/wandb/`).
    """

    def __init__(self, project: str, group: str, directory: str | os.PathLike):
        import wandb

        self._wandb = wandb
        self.project, self.group, self.directory = project, group, Path(directory)
        super().__init__()

    @classmethod
    def from_env(cls, output_dir: str | os.PathLike, run_name: str | None) -> WandbReporter:
        directory = os.environ.get("WANDB_DIR") or output_dir
        return cls(os.environ.get("WANDB_PROJECT", "huggingface"), experiment_name(output_dir, run_name), directory)

    def start(self, run: Run) -> None:
        if run.name in self.runs:  # resumed after a stop: its W&B run is still open
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        run_id = self.run_ids.get(run.name)  # opened before a checkpoint this experiment resumed from
        self.runs[run.name] = wandb_run = self._wandb.init(
            project=self.project,
            group=self.group,
            name=run.name,
            config=run_params(run),
            tags=[f"parent:{run.spec.parent}"] if run.spec.parent else None,
            dir=str(self.directory),
            reinit="create_new",
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_ids[run.name] = wandb_run.id

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None:
        if run.name in self.finished:  # a finished W&B run takes no more data; the ledger has it
            logger.debug("W&B run of %r is finished; not logging %s", run.name, sorted(values))
            return
        self.start(run)
        self.runs[run.name].log({**hf_metric_names(values), "chunk": chunk}, step=step)

    def finish(self, run: Run) -> None:
        wandb_run = self.runs.get(run.name)
        if wandb_run is None or run.name in self.finished:
            return
        wandb_run.summary["rf/status"] = run.status
        if run.error:
            wandb_run.summary["rf/error"] = run.error[:5000]
        if run.reason:
            wandb_run.summary["rf/reason"] = run.reason[:5000]
        if run.status == "stopped":  # it may be resumed, and a finished W&B run takes no more data
            return
        wandb_run.finish(exit_code=1 if run.status == "failed" else 0)
        self.finished.add(run.name)


class TrackioReporter(_OneRunEach):
    """One Trackio run per rf run, in the experiment's Trackio project, in trackio's local store (`TRACKIO_DIR`).

    `trackio.init()` finishes the process's current run before it starts another, so the runs are `trackio.Run`
    objects built directly, as `trackio.init()` builds them: each has its own run id and writer thread and logs into
    the same project database, so all of them stay open side by side. Trackio has no run status: a failed or deleted
    run logs `rf/failed` or `rf/deleted` = 1 at its last step (so a run that failed before logging still shows, with
    its config); the status is in the ledger and `run.json`. The Trackio run ids are kept in experiment
    checkpoints: a resumed experiment logs into the same Trackio runs (same name and id in the same project).

    Args:
        project (`str`): The Trackio project that holds the experiment's runs.
    """

    def __init__(self, project: str):
        import trackio

        self._trackio = trackio
        self.project = project
        super().__init__()

    @classmethod
    def from_env(cls, output_dir: str | os.PathLike, run_name: str | None) -> TrackioReporter:
        return cls(experiment_name(output_dir, run_name))

    def start(self, run: Run) -> None:
        if run.name in self.runs:
            return
        self.runs[run.name] = trackio_run = self._trackio.Run(
            url=None, project=self.project, client=None, name=run.name, run_id=self.run_ids.get(run.name),
            config=run_params(run),
        )  # fmt: skip
        self.run_ids[run.name] = trackio_run.id

    def log(self, run: Run, step: int, chunk: int, values: dict[str, Any]) -> None:
        # A finished trackio run still takes logs (written at once instead of by its stopped thread).
        self.start(run)
        self.runs[run.name].log({**hf_metric_names(values), "chunk": chunk}, step=step)

    def finish(self, run: Run) -> None:
        if run.name in self.finished or run.status == "stopped":  # a stopped run may resume
            return
        if run.status in ("failed", "deleted"):  # Trackio has no run status (and shows no run that logged nothing)
            self.start(run)
            self.runs[run.name].log({f"rf/{run.status}": 1.0}, step=run.global_step)
        trackio_run = self.runs.get(run.name)
        if trackio_run is None:
            return
        trackio_run.finish()
        self.finished.add(run.name)


REPORTERS = {
    "mlflow": MlflowReporter,
    "tensorboard": TensorBoardReporter,
    "wandb": WandbReporter,
    "trackio": TrackioReporter,
}


def check_backends(names: Sequence[str]) -> None:
    """Refuse, before any work, a `report_to` backend driven per run whose library is not installed.

    Raises:
        `ImportError`: naming the backend and the rf-callbacks extra that installs it.
    """
    for name in names:
        # Each backend's library, and the rf-callbacks extra that installs it, have the backend's name.
        if name in REPORTERS and importlib.util.find_spec(name) is None:
            raise ImportError(
                f"report_to={name!r} needs the {name} library, which is not installed; install it with "
                f'pip install "rf-callbacks[{name}]"'
            )


def make_reporters(names: Sequence[str], output_dir: str | os.PathLike, run_name: str | None) -> list[Reporter]:
    """One reporter per backend in `names` that rf-callbacks drives per run (`REPORTERS`); other names are ignored.

    Args:
        names (`Sequence[str]`): `report_to` names, as in `TrainingArguments.report_to`.
        output_dir (`str` or `os.PathLike`): The experiment's output folder (default home of the local stores).
        run_name (`str`, *optional*): `args.run_name`, the experiment's name when set.
    """
    names = [name for name in names if name in REPORTERS]
    check_backends(names)
    return [REPORTERS[name].from_env(output_dir, run_name) for name in names]
