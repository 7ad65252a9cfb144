"""Experiment checkpoints: everything needed to continue a killed experiment so that it ends bit-for-bit as if it
had never stopped.

At boundaries (every `checkpoint_every` of them, and when training ends) `<output_dir>/checkpoints/checkpoint-<k>/`
gets, for every run, its adapter (and its weights at its last boundary), optimizer, LR scheduler, random generators,
loss accumulators, per-run trainer metrics and `TrainerState`; and, for the experiment, each run's status and place
in the data, how each clone was made, the ops not applied yet, the policies' state, the reporters' run ids and the
length of `ledger.jsonl`. Tensors go to safetensors, optimizer/scheduler state dicts to `torch.save` files that are
read back with `weights_only=True` (no code runs on load), everything else to JSON. A checkpoint is written to a
temporary folder and renamed into place, so a kill at any moment leaves either the previous checkpoint or the new one,
never half of one. A run that has not trained since the previous checkpoint has its files hard-linked, not rewritten.

Resuming (`trainer.train(resume_from_checkpoint=True)` or a path, or `rf-callbacks resume --dir OUT`, which reruns the
script that wrote it) rebuilds the runs from the same script's configs plus the recorded clones, loads their state,
cuts `ledger.jsonl` back to its length at the checkpoint (what was logged after it is logged again, not twice),
reattaches the reporters to their tracking runs (MLflow, W&B and Trackio run ids are in the manifest) and goes on
from the next slice. Reporters get each chunk's logs when the checkpoint that keeps them is written; logs sent after
the last checkpoint by an interrupted `train()` (when its trainer was closed) are counted in `reported.json` next to
the checkpoint, and a resume from it skips that many, so a tracker gets each step once. Ops accepted after the
checkpoint from outside the script (socket, CLI, dashboard) are read from the cut part of the ledger and queued again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerState

from .ledger import write_json_atomic
from .oom import halve_micro_batch
from .ops import Op, OpError
from .run import TRAINER_SCALARS, Run

FORMAT = 1
RESUME_ENV = "RF_CALLBACKS_RESUME"  # set by `rf-callbacks resume`: the rerun script's `train()` resumes


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-<k>` under `<output_dir>/checkpoints` (temporary folders do not count)."""
    root = checkpoints_dir(output_dir)
    found = [p for p in root.glob("checkpoint-*") if _number(p) >= 0 and (p / "checkpoint.json").exists()]
    return max(found, key=_number, default=None)


def _number(path: Path) -> int:
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def _rng_to_files(rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.cpu": rng["cpu"]}
    for i, state in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = state
    version, keys, gauss = rng["python"]
    kind, numpy_keys, pos, has_gauss, cached = rng["numpy"]
    record = {
        "python": [version, list(keys), gauss],
        "numpy": [kind, numpy_keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "cuda_devices": len(rng.get("cuda", [])),
    }
    return tensors, record


def _rng_from_files(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, Any]:
    version, keys, gauss = record["python"]
    kind, numpy_keys, pos, has_gauss, cached = record["numpy"]
    rng = {
        "python": (version, tuple(keys), gauss),
        "numpy": (kind, np.array(numpy_keys, dtype=np.uint32), pos, has_gauss, cached),
        "cpu": tensors["rng.cpu"],
    }
    if record["cuda_devices"]:
        rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(record["cuda_devices"])]
    return rng


@dataclasses.dataclass
class Checkpoints:
    """When experiment checkpoints are due, and which one the experiment is in step with.

    Args:
        every (`int` or `None`): Boundaries between checkpoints (`checkpoint_every`); `None` when `save_strategy="no"`.
        keep (`int`): How many checkpoints stay on disk (`save_total_limit`, default 2).
    """

    every: int | None
    keep: int
    boundaries: int = 0  # boundaries reached in this experiment, by every process (checkpoints are numbered by it)
    since: int = 0  # boundaries since the last checkpoint
    resume: Path | None = None  # the checkpoint `train()` continues from, until the loop has loaded it
    last: Path | None = None  # the checkpoint the reporters' backends are in step with

    @classmethod
    def from_args(cls, args: Any, every: int | None) -> Checkpoints:
        return cls(every=(every or 1) if args.save_strategy != "no" else None, keep=args.save_total_limit or 2)

    def passed(self, boundaries: int = 1) -> None:
        """Count boundaries reached (by this process, or by the others when they report)."""
        self.boundaries += boundaries
        self.since += boundaries

    def due(self, should_save: bool, final: bool = False) -> bool:
        """Whether a checkpoint is written now (`final`: training ended; one is due if any boundary is unsaved)."""
        if self.every is None or not should_save:
            return False
        return self.since >= self.every or (final and self.since > 0)

    def written(self, path: Path | None = None) -> None:
        """A checkpoint was written (at `path`; `None` on a process that leaves the writing to rank 0)."""
        self.since = 0
        if path is not None:
            self.last = path


class Checkpointer:
    """The experiment checkpoints of one trainer: when one is due (`schedule`), writing one atomically at a boundary,
    and resuming from one. It uses the trainer only through the interface `docs/maintainers.md` lists (a test holds it
    to the code).

    Args:
        trainer (`MultiConfigMixin`): the trainer whose runs are checkpointed.
        schedule (`Checkpoints`): when checkpoints are due, and which one the experiment is in step with.
    """

    def __init__(self, trainer: Any, schedule: Checkpoints):
        self.trainer, self.schedule = trainer, schedule

    def due(self, final: bool = False) -> bool:
        """Whether a checkpoint is written now (`final`: training ended)."""
        return self.schedule.due(self.trainer._rf_setup.args.should_save, final)

    def maybe_write(self, final: bool = False) -> None:
        if self.due(final):
            self.write()

    def write(self, sent: dict[str, dict[str, bytes]] | None = None) -> Path:
        """Write a checkpoint now. `sent`: the files of runs whose state another process holds (several processes:
        rank 0 writes them as they came)."""
        trainer, schedule, sent = self.trainer, self.schedule, sent or {}
        if trainer.active_run is not None:  # its state lives in the trainer's attributes; it stays active
            trainer._sync_attributes(trainer.active_run)
        root = checkpoints_dir(trainer._rf_setup.output_dir)
        final = root / f"checkpoint-{schedule.boundaries}"
        temp = root / f".tmp-checkpoint-{schedule.boundaries}"
        shutil.rmtree(temp, ignore_errors=True)
        (temp / "runs").mkdir(parents=True)
        records = []
        for run in trainer.coordinator:
            folder = temp / "runs" / run.name
            folder.mkdir()
            if run.checkpoint_files is not None and not run.dirty:
                for source in run.checkpoint_files.iterdir():
                    os.link(source, folder / source.name)
            elif run.name in sent:
                for name, data in sent[run.name].items():
                    (folder / name).write_bytes(data)
            else:
                self.write_run(run, folder)
            records.append({**run.record(), "activated": bool(run.attributes) and run.status != "deleted"})
        ledger_bytes = trainer._rf_records.flush()
        manifest = {
            "format": FORMAT,
            "trainer": type(trainer).__name__,
            "boundary": schedule.boundaries,
            "time": time.time(),
            "ledger_bytes": ledger_bytes,
            "num_chunks": trainer._rf_setup.num_chunks,
            "runs": records,
            "pending_ops": [op.record() for op in trainer._rf_ops.pending],
            "policies": trainer._rf_policies.state_dict(),
            "reporters": trainer._rf_records.state_dict(),
            "argv": [sys.executable, *sys.argv],
            "cwd": os.getcwd(),
        }
        (temp / "checkpoint.json").write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        if final.exists():  # written before a resume went back past it
            shutil.rmtree(final)
        os.replace(temp, final)
        _fsync_dir(root)
        for run in trainer.coordinator:
            run.checkpoint_files, run.dirty = final / "runs" / run.name, False
        schedule.written(final)
        trainer._rf_records.write(None, None, None, "checkpoint", path=str(final))
        done = sorted((p for p in root.glob("checkpoint-*") if p != final and _number(p) >= 0), key=_number)
        for old in done[: max(0, len(done) - schedule.keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def reported(self, sent: list[int]) -> None:
        """After an interrupted `train()` the reporters were sent what came after the last checkpoint (`sent`: how
        many logs of each run went out): `reported.json` in that checkpoint says so, and a resume from it does not send
        them again."""
        last = self.schedule.last
        if any(sent) and last is not None and last.exists():
            write_json_atomic(last / "reported.json", {"reporters": sent})

    def write_run(self, run: Run, folder: Path) -> None:
        """One run's files (its adapter, and when it has trained its optimizer, scheduler, RNG and trainer state)."""
        trainer = self.trainer
        tensors: dict[str, torch.Tensor] = {}
        record: dict[str, Any] = {}
        if run.status != "deleted":
            if run.trainable:
                adapter = zip(run.trainable_names, run.trainable)
            else:  # never activated (or a failed clone): find its parameters by adapter name
                prefix = f".{run.spec.adapter_name}."
                adapter = ((name, p) for name, p in trainer.model.named_parameters() if prefix in name)
            for name, param in adapter:
                tensors[f"adapter.{name}"] = param.detach().to("cpu", copy=True).contiguous()
            for name, value in (run.boundary_weights or {}).items():
                tensors[f"boundary.{name}"] = value.contiguous()
        if run.attributes and run.status != "deleted":
            attributes = run.attributes
            tensors["tr_loss"] = attributes["_tr_loss"].detach().to("cpu", copy=True).reshape(1)
            rng_tensors, record["rng"] = _rng_to_files(run.rng)
            tensors.update(rng_tensors)
            record["scalars"] = {name: attributes[name] for name in TRAINER_SCALARS}
            record["extra"] = trainer._checkpoint_extra_state(run, tensors)
            torch.save(attributes["optimizer"].state_dict(), folder / "optimizer.pt")
            torch.save(attributes["lr_scheduler"].state_dict(), folder / "scheduler.pt")
        if run.optimizer_init is not None:
            torch.save(run.optimizer_init, folder / "optimizer_init.pt")
        if run.state is not None:
            run.state.save_to_json(str(folder / "trainer_state.json"))
        save_file(tensors, folder / "state.safetensors")
        (folder / "state.json").write_text(json.dumps(record), encoding="utf-8")

    # ------------------------------------------------------------------------------------------------ reading
    def resolve(self, resume_from_checkpoint: str | bool | os.PathLike) -> Path:
        """The checkpoint `train(resume_from_checkpoint=...)` names: `True` for the newest, or a folder."""
        trainer = self.trainer
        if resume_from_checkpoint is True:
            output_dir = trainer._rf_setup.output_dir
            path = latest_checkpoint(output_dir)
            if path is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {checkpoints_dir(output_dir)} holds no checkpoint "
                    f"(checkpoints are written when save_strategy is not 'no')"
                )
            return path
        path = Path(resume_from_checkpoint)
        if path.is_dir() and not (path / "checkpoint.json").exists():
            path = latest_checkpoint(path) or latest_checkpoint(path.parent) or path
        if not (path / "checkpoint.json").exists():
            raise ValueError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not an rf-callbacks checkpoint"
            )
        return path

    def resume_from(self, path: Path) -> None:
        """Load the experiment's state from the checkpoint at `path` (before the loop's first slice)."""
        trainer = self.trainer
        manifest = json.loads((path / "checkpoint.json").read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("trainer") != type(trainer).__name__:
            raise ValueError(
                f"{path} was written by {manifest.get('trainer')} (format {manifest.get('format')}), not by "
                f"{type(trainer).__name__} (format {FORMAT})"
            )
        records = manifest["runs"]
        originals = [r["name"] for r in records if r["clone"] is None]
        if originals != list(trainer.coordinator.runs):
            raise ValueError(
                f"{path} holds runs {originals}, but this trainer was built with {list(trainer.coordinator.runs)}; "
                f"resume with the configs that started the experiment"
            )
        if manifest["num_chunks"] != trainer._rf_setup.num_chunks:
            raise ValueError(f"{path} used num_chunks={manifest['num_chunks']}, not {trainer._rf_setup.num_chunks}")
        ledger = trainer._rf_setup.output_dir / "ledger.jsonl"
        replay = []
        main = trainer._rf_records.is_main  # several processes: rank 0's records
        if ledger.exists() and main:
            replay = self._outside_ops_after(ledger, manifest["ledger_bytes"])
            trainer._rf_records.truncate(manifest["ledger_bytes"])  # what came after the checkpoint is written again
        trainer._rf_records.open(resuming=True)
        reported = None  # logs an interrupted process sent after this checkpoint
        if (path / "reported.json").exists():
            reported = json.loads((path / "reported.json").read_text(encoding="utf-8"))["reporters"]
        trainer._rf_records.load_state_dict(manifest["reporters"], reported)
        for record in records:
            if record["clone"] is not None:
                self._restore_clone(record["clone"])
        for record in records:
            self.restore_run(trainer.coordinator[record["name"]], record, path / "runs" / record["name"])
        trainer._rf_policies.load_state_dict(manifest["policies"])
        trainer._rf_ops.pending = (
            [Op.from_record(op) for op in manifest["pending_ops"]] if main else []
        )  # rank 0 sends
        for op in trainer._rf_ops.pending:
            if op.kind == "clone":
                op.spec = trainer._clone_spec(op)
        self.schedule.boundaries = manifest["boundary"]
        self.schedule.last = path
        trainer._rf_records.write(None, None, None, "resumed", path=str(path), replayed_ops=len(replay))
        for op in replay:
            with contextlib.suppress(OpError):  # no longer valid here: recorded as refused, with the reason
                trainer.submit_op(op)

    def _outside_ops_after(self, ledger: Path, offset: int) -> list[Op]:
        """Ops accepted after the checkpoint from outside the script (socket, CLI, dashboard): the rerun script and
        its policies issue their own ops again, these nobody would. They are queued again, so they take effect at the
        checkpoint's boundary (a stop or delete possibly a few steps earlier than it first did)."""
        trainer = self.trainer
        issued_here = {"python"} | trainer._rf_policies.names()
        with open(ledger, "rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
        ops = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line the kill cut
                continue
            if record.get("event") != "op" or not record.get("accepted") or record.get("by") in issued_here:
                continue
            ops.append(Op.from_described(record))
        return ops

    def _restore_clone(self, record: dict[str, Any]) -> None:
        trainer = self.trainer
        if "parent" in record:  # checkpoints before 2026-12-07 named the parent "parent"
            record = {**record, "kind": "clone", "run": record["parent"]}
        op = Op.from_record(record)
        op.spec = trainer._clone_spec(op)
        trainer._rf_applier.add_clone(
            op, trainer.coordinator[op.run], start_slice=record["start_slice"], restoring=True
        )

    def restore_run(self, run: Run, record: dict[str, Any], folder: Path) -> None:
        """Load one run's files from `folder` into the run (and the trainer, while it is activated to load them)."""
        trainer = self.trainer
        if record.get("oom_retry") and run.oom_retry is None:  # it went on with half the micro-batch
            halve_micro_batch(run)
            run.oom_retry = record["oom_retry"]
        tensors = load_file(folder / "state.safetensors")
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if record["status"] == "deleted":
            if run.status != "deleted":
                trainer._rf_applier.free_run(run)
        else:
            params = dict(trainer.model.named_parameters())
            with torch.no_grad():
                for key, value in tensors.items():
                    if key.startswith("adapter."):
                        params[key[len("adapter.") :]].copy_(value)
            if record["activated"]:
                trainer._activate(run)
                trainer.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
                trainer.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
                trainer._tr_loss = tensors["tr_loss"].to(trainer.args.device).reshape(())
                for name, value in state["scalars"].items():
                    setattr(trainer, name, value)
                trainer._load_extra_state(state["extra"], tensors)
                run.rng = _rng_from_files(tensors, state["rng"])
            boundary = {k[len("boundary.") :]: v for k, v in tensors.items() if k.startswith("boundary.")}
            run.boundary_weights = boundary or None
            if (folder / "optimizer_init.pt").exists():
                run.optimizer_init = torch.load(folder / "optimizer_init.pt", weights_only=True)
        if (folder / "trainer_state.json").exists():
            loaded = TrainerState.load_from_json(str(folder / "trainer_state.json"))
            if run.state is not None:
                loaded.stateful_callbacks = run.state.stateful_callbacks
            if trainer.active_run is run:
                trainer.state = loaded
            run.attributes["state"] = loaded
        if trainer.active_run is run:
            trainer._park(run)
        run.load_record(record)
        run.checkpoint_files, run.dirty = folder, False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
