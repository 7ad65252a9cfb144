"""`Experiment`: RapidFire AI's `run_fit` entry point, as a thin layer over `RFSFTTrainer`.

```python
experiment = Experiment(experiment_name="sft-comparison")
experiment.run_fit(RFGridSearch(configs=configs, trainer_type="SFT"), create_model, train_dataset, num_chunks=4)
experiment.get_results()   # pandas DataFrame: one row per (run, logged step)
experiment.end()
```

`run_fit` checks everything first (each leaf, each formatting_func's output on every row, each group's arguments
and chunk count), then trains group after group (see `automl/plan.py` for what makes a group). Each group is one
`RFSFTTrainer`: its runs rotate chunk by chunk, so within a group every run reaches chunk c before any run goes past
it. Groups run one after another, those on the same base next to each other; `create_model_fn` is called once per
base, and a base is dropped before the next one is created, so one base is resident at a time. Run ids are
1-based integers in search order (continuing across `run_fit` calls); the trainer names them `run-<id>`.

Layout: `<experiment_path or $RF_EXPERIMENT_PATH or ./rf_experiments>/<experiment_name>/group-<k>/` holds each
group's trainer output (`experiment.json`, `ledger.jsonl`, `runs/run-<id>/` with the adapter), and `runs.json`
the runs table of `get_runs_info()`.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .chunks import check_num_chunks

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_TRAINERS = {"SFT": "RFSFTTrainer", "DPO": "RFDPOTrainer", "GRPO": "RFGRPOTrainer"}
_LEDGER_SKIP = ("time", "run", "event")
RUN_COLUMNS = ("run_id", "run_name", "status", "model_name", "group", "global_step", "max_steps", "chunks_done")
RUN_COLUMNS += ("parent", "error", "train_loss", "eval_loss", "output_dir", "config")


def _trainer_class(trainer_type: str):
    import rf_callbacks

    try:
        return getattr(rf_callbacks, _TRAINERS[trainer_type])
    except AttributeError:
        raise NotImplementedError(
            f"trainer_type={trainer_type!r} needs rf_callbacks.{_TRAINERS[trainer_type]}, which this version does not "
            "have yet; only trainer_type='SFT' can run now"
        ) from None


class Experiment:
    """A named folder of runs, trained with `run_fit` and read back with `get_results`/`get_runs_info`.

    Args:
        experiment_name (`str`): Folder name; if taken, `_2`, `_3`, ... is appended (see `experiment_name`).
        mode (`str`, *optional*, defaults to `"fit"`): Only "fit" (RapidFire AI's "evals" mode is not provided).
        experiment_path (`str`, *optional*): Parent folder; default `$RF_EXPERIMENT_PATH`, else `./rf_experiments`.
    """

    def __init__(self, experiment_name: str, mode: str = "fit", experiment_path: str | os.PathLike | None = None):
        if mode != "fit":
            raise ValueError(f"mode={mode!r} is not supported; rf-callbacks provides mode='fit' only")
        if not isinstance(experiment_name, str) or not _NAME_RE.match(experiment_name):
            raise ValueError(
                f"experiment_name={experiment_name!r} is invalid; use letters, digits, '_', '.', '-' "
                "(it names a folder)"
            )
        root = Path(experiment_path or os.environ.get("RF_EXPERIMENT_PATH") or "rf_experiments")
        root.mkdir(parents=True, exist_ok=True)
        path, suffix = root / experiment_name, 2
        while True:
            try:
                path.mkdir()
                break
            except FileExistsError:
                path, suffix = root / f"{experiment_name}_{suffix}", suffix + 1
        self.experiment_name, self.experiment_path, self.path = path.name, root, path
        self._runs: dict[int, dict[str, Any]] = {}
        self._ledgers: list[Path] = []
        self._trainer = None
        self._ended = False

    # ------------------------------------------------------------------------------------------------ training
    def run_fit(
        self,
        config_group: Any = None,
        create_model_fn: Callable[[dict[str, Any]], Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        num_chunks: int | str = 4,
        seed: int = 42,
        *,
        num_shards: int | None = None,
        param_config: Any = None,
        policies: list | None = None,
        boundary_eval: bool = True,
        fused: bool = False,
    ) -> None:
        """Train every leaf of `config_group` (an `RFGridSearch`/`RFRandomSearch`, or configs for a grid search).

        Args:
            config_group: The search. `param_config=` is accepted as RapidFire AI's name for it.
            create_model_fn (`Callable`): `dict(model_name, model_type, model_kwargs, tokenizer, tokenizer_kwargs)
                -> (model, tokenizer)` (or just the model); called once per distinct base.
            train_dataset, eval_dataset (`datasets.Dataset`): Raw rows; each leaf's formatting_func maps them.
            num_chunks (`int` or `"auto"`, *optional*, defaults to `4`): Chunks per epoch (`num_shards=` is an alias);
                `"auto"` as in [`RFSFTTrainer`].
            seed (`int`, *optional*, defaults to `42`): `seed` of every leaf whose training_args set none; with it,
                the data order of a group (its first leaf's `data_seed`, else `seed`).
            policies (`list[Policy]`, *optional*): Automatic decisions at chunk boundaries (`rf_callbacks.policies`);
                each group of runs trained together gets its own copy.
            boundary_eval (`bool`, *optional*, defaults to `True`): `False` evaluates runs only where a policy needs
                it and at their end (see [`RFSFTTrainer`]).
            fused (`bool`, *optional*, defaults to `False`): Train the runs of an SFT group at the same chunk in one
                forward/backward per micro-batch (see [`RFSFTTrainer`]); DPO and GRPO searches refuse it.
        """
        from .automl.plan import plan_jobs
        from .automl.search import RFGridSearch, _Search

        if self._ended:
            raise RuntimeError(f"experiment {self.experiment_name!r} has ended; create a new Experiment")
        search = config_group if config_group is not None else param_config
        search = search if isinstance(search, _Search) else RFGridSearch(search, "SFT")
        num_chunks = num_shards if num_shards is not None else num_chunks
        check_num_chunks(num_chunks)
        if not callable(create_model_fn):
            raise ValueError("create_model_fn must be a function: model_config dict -> (model, tokenizer)")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if fused and search.trainer_type != "SFT":
            raise ValueError(f"fused=True is supported for SFT searches only, not {search.trainer_type}")
        trainer_cls = _trainer_class(search.trainer_type)
        jobs = plan_jobs(
            search,
            trainer_cls,
            train_dataset,
            eval_dataset,
            num_chunks,
            seed,
            folder=lambda k: self.path / f"group-{k}",
            first_run_id=max(self._runs, default=0) + 1,
            first_group=len(self._ledgers) + 1,
        )
        for job in jobs:  # everything is checked: record the runs, then train
            for member in job.group.members:
                self._runs[member.run_id] = _run_record(member, job)
            self._ledgers.append(job.folder / "ledger.jsonl")
        self._write_runs()

        model = tokenizer = base = failed = None
        for job in jobs:
            if job.group.base != base:
                model = tokenizer = None
                self._free()
                base = job.group.base
                try:
                    model, tokenizer = self._create_model(create_model_fn, job.group.ref.leaf)
                except Exception as exc:  # its runs fail with the reason; groups on other bases go on
                    logger.exception("create_model_fn failed for %s", job.folder.name)
                    failed = f"create_model_fn failed: {type(exc).__name__}: {exc}"
            if model is None:
                for member in job.group.members:
                    self._runs[member.run_id].update(status="failed", error=failed)
                self._write_runs()
                continue
            kwargs = dict(model=model, args=job.args, train_dataset=job.train, eval_dataset=job.eval)
            kwargs.update(processing_class=tokenizer, configs=job.configs, num_chunks=num_chunks)
            kwargs.update(policies=copy.deepcopy(policies), boundary_eval=boundary_eval)
            if fused:
                kwargs["fused"] = True
            model = self._train_group(trainer_cls, search.trainer_type, job.group, job.folder, kwargs)
        model = tokenizer = None
        self._free()

    def _create_model(self, create_model_fn: Callable, leaf) -> tuple[Any, Any]:
        import torch

        created = create_model_fn(
            {
                "model_name": leaf.model_name,
                "model_type": leaf.model_type,
                "model_kwargs": dict(leaf.model_kwargs or {}),
                "tokenizer": leaf.tokenizer,
                "tokenizer_kwargs": dict(leaf.tokenizer_kwargs or {}),
            }
        )
        model, tokenizer = created if isinstance(created, (tuple, list)) and len(created) == 2 else (created, None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"create_model_fn returned {type(created).__name__} for model {leaf.model_name!r}; it must return "
                "(model, tokenizer) or just the model (a transformers model)"
            )
        if tokenizer is None and not model.config._name_or_path:  # TRL would load it from there
            raise ValueError(
                f"create_model_fn returned no tokenizer for model {leaf.model_name!r}, and the model (built in "
                "memory) has no name or path to load one from; return (model, tokenizer)"
            )
        return model, tokenizer

    def _train_group(self, trainer_cls, trainer_type: str, group, out: Path, kwargs: dict[str, Any]):
        """Train one group with one trainer; return the base model with every adapter removed, for the next group."""
        from peft import PeftModel

        from .automl.generation import GenerationMetricsCallback

        ref = group.ref.leaf
        if ref.generation_config is None and ref.compute_metrics is not None:
            kwargs["compute_metrics"] = ref.compute_metrics  # transformers' logits-based contract
        if trainer_type == "GRPO":
            kwargs["reward_funcs"] = ref.reward_funcs
        if trainer_type == "DPO" and ref.ref_model_name:  # one reference model shared by the whole group
            from transformers import AutoModelForCausalLM

            kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(
                ref.ref_model_name, **(ref.ref_model_kwargs or {})
            )
        trainer = self._trainer = trainer_cls(**kwargs)
        per_run = {
            m.name: (m.leaf.compute_metrics, m.leaf.generation_config)
            for m in group.members
            if m.leaf.compute_metrics is not None and m.leaf.generation_config is not None
        }
        evals = kwargs["eval_dataset"]
        if per_run and evals is not None:
            callback = GenerationMetricsCallback(
                next(iter(evals.values())) if isinstance(evals, dict) else evals, per_run
            )
            callback.trainer = trainer
            trainer.add_callback(callback)
        for member in group.members:
            self._runs[member.run_id]["status"] = "running"
        error = None
        try:
            trainer.train()
        except Exception as exc:  # a single-run trainer re-raises its run's failure; the other groups go on
            logger.exception("group %s failed", out.name)
            error = f"{type(exc).__name__}: {exc}"
        ids = {member.name: member.run_id for member in group.members}
        for row in trainer.results():  # in order: a clone (an IC op, a policy) comes after its parent
            if row["name"] not in ids:
                parent = self._runs.get(ids.get(row["parent"]), {})
                ids[row["name"]] = run_id = max(self._runs) + 1
                self._runs[run_id] = record = dict.fromkeys(RUN_COLUMNS)
                record.update(run_id=run_id, run_name=row["name"], model_name=parent.get("model_name"))
                record.update(group=out.name, config={**parent.get("config", {}), **row["config"]})
                record["output_dir"] = str(out / "runs" / row["name"])
            record = self._runs[ids[row["name"]]]
            for key in (
                "status",
                "global_step",
                "max_steps",
                "chunks_done",
                "parent",
                "error",
                "train_loss",
                "eval_loss",
            ):
                record[key] = row[key]
            if error is not None and record["status"] != "completed":
                record["status"], record["error"] = "failed", record["error"] or error
        self._write_runs()
        model = trainer.model
        trainer.close()  # its ledger and reporters (files, tracking runs)
        self._trainer = trainer = None
        if isinstance(model, PeftModel):
            model = model.unload()  # removes the LoRA layers: the untouched base, ready for the next group
            if hasattr(model, "peft_config"):
                del model.peft_config
        return model

    @staticmethod
    def _free() -> None:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _write_runs(self) -> None:
        from .ledger import write_json_atomic

        write_json_atomic(
            self.path / "runs.json", {"experiment_name": self.experiment_name, "runs": list(self._runs.values())}
        )

    # ------------------------------------------------------------------------------------------------ results
    def get_results(self):
        """A pandas DataFrame with one row per (run, logged step): `run_id`, `step`, `config.<field>` columns, then
        every value logged at that step (`loss`, `learning_rate`, `eval_loss`, `eval_<metric>`, `chunk`, ...)."""
        import pandas as pd

        from .ledger import read_ledger

        ids = {record["run_name"]: run_id for run_id, record in self._runs.items()}
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        for path in self._ledgers:
            for entry in read_ledger(path) if path.exists() else []:
                run_id = ids.get(entry.get("run"))
                if entry.get("event") != "log" or run_id is None:
                    continue
                row = rows.setdefault((run_id, entry["step"]), {"run_id": run_id, "step": entry["step"]})
                row.update({key: value for key, value in entry.items() if key not in _LEDGER_SKIP})
        if not rows:
            return pd.DataFrame(columns=["run_id", "step"])
        metrics = pd.DataFrame([rows[key] for key in sorted(rows)])
        configs = pd.DataFrame(
            [
                {"run_id": run_id, **{f"config.{key}": _cell(value) for key, value in record["config"].items()}}
                for run_id, record in self._runs.items()
            ]
        )
        frame = metrics.merge(configs, on="run_id", how="left")
        config_columns = [column for column in frame.columns if column.startswith("config.")]
        return frame[["run_id", "step", *config_columns, *metrics.columns[2:]]]

    def get_runs_info(self):
        """A pandas DataFrame with one row per run: `run_id`, `run_name`, `status`, `model_name`, `group`,
        `global_step`, `max_steps`, `chunks_done`, `parent`, `error`, last `train_loss`/`eval_loss`, `output_dir`
        (its adapter) and `config` (a dict)."""
        import pandas as pd

        return pd.DataFrame([self._runs[run_id] for run_id in sorted(self._runs)], columns=list(RUN_COLUMNS))

    def end(self) -> None:
        """Close any open trainer's ledger and reporters and free the model; the experiment then takes no run_fit."""
        if self._trainer is not None:
            self._trainer.close()
            self._trainer = None
        self._free()
        if not self._ended:
            self._write_runs()
        self._ended = True


def _run_record(member, job) -> dict[str, Any]:
    from .automl.plan import leaf_summary

    record = dict.fromkeys(RUN_COLUMNS)
    record.update(run_id=member.run_id, run_name=member.name, status="pending", model_name=member.leaf.model_name)
    record.update(group=job.folder.name, global_step=0, chunks_done=0, config=leaf_summary(member.leaf))
    record["output_dir"] = str(job.folder / "runs" / member.name)
    return record


def _cell(value: Any) -> Any:
    """Config values as DataFrame cells: lists and dicts become their JSON-ish text."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
