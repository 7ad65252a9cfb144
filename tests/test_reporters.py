"""Per-run tracking: one tracking run per rf run in each backend's real local store, offline, read back with the
backend's own reader (MLflow's client, TensorBoard's EventAccumulator, trackio's storage, W&B's record format)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from peft import LoraConfig
from transformers import TrainerCallback, set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger


def test_mlflow_gets_one_run_per_config(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rf-test")
    out = tmp_path / "out"
    set_seed(0)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=6, report_to="mlflow"),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[
            {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
            {"name": "b", "peft_config": LoraConfig(r=8, target_modules=["v_proj"]), "learning_rate": 5e-3},
        ],
        num_chunks=2,
    )
    trainer.train()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rf-test")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"a", "b"}
    ledger = read_ledger(out / "ledger.jsonl")
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["r"] == ("4" if name == "a" else "8")
        history = client.get_metric_history(run.info.run_id, "train/loss")
        expected = [(r["step"], r["loss"]) for r in ledger if r["run"] == name and "loss" in r]
        assert [m.step for m in history] == [step for step, _ in expected]
        assert [m.value for m in history] == pytest.approx([loss for _, loss in expected])
        assert client.get_metric_history(run.info.run_id, "eval/loss")
        chunks = {float(r["chunk"]) for r in ledger if r["run"] == name and r["event"] == "log"}
        assert chunks == {0.0}  # 6 of the epoch's 24 steps: every log (the final summary too) is in chunk 0
        assert {m.value for m in client.get_metric_history(run.info.run_id, "chunk")} == chunks
    assert runs["b"].data.params["learning_rate"] == "0.005"


def train_two_runs(tokenizer, chat_data, sft_args, out: Path, **args) -> list[dict]:
    """Runs `a` and `b` (different ranks, targets and learning rates), 4 steps each over 2 chunks; the ledger."""
    set_seed(0)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=4, **args),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[
            {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
            {"name": "b", "peft_config": LoraConfig(r=8, target_modules=["v_proj"]), "learning_rate": 5e-3},
        ],
        num_chunks=2,
    )
    names = {type(callback).__name__ for callback in trainer.callback_handler.callbacks}
    assert not names & {"MLflowCallback", "TensorBoardCallback", "WandbCallback", "TrackioCallback"}
    trainer.train()
    assert [row["status"] for row in trainer.results()] == ["completed", "completed"]
    return read_ledger(out / "ledger.jsonl")


def logged_losses(ledger: list[dict], name: str) -> list[tuple[int, float]]:
    return [(record["step"], record["loss"]) for record in ledger if record["run"] == name and "loss" in record]


def test_tensorboard_gets_one_log_dir_per_run(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    ledger = train_two_runs(tokenizer, chat_data, sft_args, out, report_to="tensorboard")

    root = out / "tensorboard"
    assert sorted(path.name for path in root.iterdir()) == ["a", "b"]
    for name, rank in (("a", 4), ("b", 8)):
        events = EventAccumulator(str(root / name))
        events.Reload()
        losses = [(event.step, event.value) for event in events.Scalars("train/loss")]
        expected = logged_losses(ledger, name)
        assert [step for step, _ in losses] == [step for step, _ in expected] == [1, 2, 3, 4]
        assert [value for _, value in losses] == pytest.approx([loss for _, loss in expected], rel=1e-6)  # float32
        assert events.Scalars("eval/loss") and events.Scalars("chunk")
        params = events.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"| r | {rank} |" in params and "| parent | None |" in params
        assert events.Tensors("status/text_summary")[0].tensor_proto.string_val == [b"completed"]


def wandb_records(path: Path):
    """The records of an offline run's `.wandb` file, decoded with wandb's own protobuf `Record`.

    wandb 0.31 reads these files only in its Go core (`wandb sync`), so this walks the LevelDB log format they are
    written in: a 7-byte `:W&B` header, then 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1)`, where
    type 1 is a whole record and 2-4 are its first, middle and last pieces.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_key(item) -> str:
    """A history or summary item's name: wandb stores `train/loss` as the nested key `["train", "loss"]`."""
    return item.key or "/".join(item.nested_key)


def test_wandb_gets_one_offline_run_per_config(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    import json

    offline = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_PROJECT": "rf-test"}
    for key, value in {**offline, "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    ledger = train_two_runs(tokenizer, chat_data, sft_args, out, report_to="wandb", run_name="rf-wandb")

    run_dirs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    runs = {}
    for run_dir in run_dirs:
        (path,) = run_dir.glob("run-*.wandb")
        records = list(wandb_records(path))
        (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
        history = [
            {wandb_key(item): json.loads(item.value_json) for item in record.history.item}
            for record in records
            if record.WhichOneof("record_type") == "history"
        ]
        summary = {
            wandb_key(item): json.loads(item.value_json)
            for record in records
            if record.WhichOneof("record_type") == "summary"
            for item in record.summary.update
        }
        (exit_record,) = [record.exit for record in records if record.WhichOneof("record_type") == "exit"]
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        runs[run.display_name] = (run, config, history, summary, exit_record)
    assert set(runs) == {"a", "b"}
    for name, (run, config, history, summary, exit_record) in runs.items():
        assert (run.project, run.run_group) == ("rf-test", "rf-wandb")
        assert config["r"] == (4 if name == "a" else 8) and config["parent"] is None
        losses = [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row]
        assert losses == logged_losses(ledger, name)
        assert any("eval/loss" in row for row in history) and all("chunk" in row for row in history)
        assert summary["rf/status"] == "completed" and exit_record.exit_code == 0
    assert runs["b"][1]["learning_rate"] == 0.005


def test_trackio_gets_one_run_per_config(tokenizer, chat_data, sft_args, tmp_path):
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    out = tmp_path / "out"
    ledger = train_two_runs(tokenizer, chat_data, sft_args, out, report_to="trackio", run_name="rf-trackio")

    # conftest points TRACKIO_DIR at a fresh folder before trackio is first imported
    assert SQLiteStorage.get_project_db_path("rf-trackio").parent == Path(os.environ["TRACKIO_DIR"])
    runs = {run.name: run for run in trackio.Api().runs("rf-trackio")}
    assert set(runs) == {"a", "b"}
    for name, run in runs.items():
        assert run.config["r"] == (4 if name == "a" else 8) and run.config["parent"] is None
        logs = SQLiteStorage.get_logs("rf-trackio", name, run_id=run.id)
        losses = [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row]
        assert losses == logged_losses(ledger, name)
        assert any("eval/loss" in row for row in logs) and all("chunk" in row for row in logs)


def test_a_run_that_fails_before_logging_still_shows_in_trackio(tokenizer, chat_data, sft_args, tmp_path):
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    class FailBad(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if Path(args.output_dir).name == "bad":
                raise RuntimeError("broken before its first log")

    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer), args=sft_args(output_dir=str(tmp_path), max_steps=2, report_to="trackio",
        run_name="rf-trackio-failed"), train_dataset=chat_data[0], processing_class=tokenizer, callbacks=[FailBad()],
        configs=[{"name": n, "peft_config": LoraConfig(r=4, target_modules=["q_proj"])} for n in ("ok", "bad")],
        num_chunks=2,
    )  # fmt: skip
    trainer.train()
    trainer.close()
    runs = {run.name: run for run in trackio.Api().runs("rf-trackio-failed")}
    assert set(runs) == {"ok", "bad"} and runs["bad"].config["r"] == 4
    logs = SQLiteStorage.get_logs("rf-trackio-failed", "bad", run_id=runs["bad"].id)
    assert [(row["step"], row["rf/failed"]) for row in logs] == [(1, 1.0)]  # it failed in its first step


def test_missing_backend_library_names_the_extra(tokenizer, chat_data, sft_args, monkeypatch):
    # What Python sees for a library that is not installed: no spec, and `import wandb` raises ImportError.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r'report_to=\'wandb\'.*pip install "rf-callbacks\[wandb\]"'):
        RFSFTTrainer(
            model=build_tiny_model(tokenizer),
            args=sft_args(report_to="wandb"),
            train_dataset=chat_data[0],
            processing_class=tokenizer,
            configs=[{"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])}],
        )


def test_mlflow_shows_a_stop_and_a_clone(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rf-ops")
    out = tmp_path / "out"
    set_seed(0)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=8, report_to="mlflow"),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[{"name": n, "peft_config": LoraConfig(r=4, target_modules=["q_proj"])} for n in ("a", "b")],
        num_chunks=2,
    )

    class Steer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer.active_run.name == "b" and state.global_step == 2:
                trainer.stop("b")
                trainer.clone("a", {"learning_rate": 5e-4}, warm_start=True, name="a2")

    trainer.add_callback(Steer())
    trainer.train()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rf-ops")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert runs["a"].info.status == "FINISHED" and runs["b"].info.status == "KILLED"
    assert runs["a2"].info.status == "FINISHED"
    assert runs["a2"].data.tags["rf.parent"] == "a" and runs["a2"].data.params["parent"] == "a"
    assert runs["a2"].data.params["warm_start"] == "True"


def test_wandb_and_trackio_runs_continue_after_an_interrupted_experiment_resumes(
    tokenizer, chat_data, sft_args, tmp_path, monkeypatch
):
    """Ctrl-C in the middle of a chunk, the trainer closed (which sends what came after the last checkpoint), then a
    resume: each rf run keeps one W&B run id and one Trackio run, and each backend holds every logged step once."""
    import json

    import trackio
    from trackio.sqlite_storage import SQLiteStorage
    from transformers import TrainerCallback

    offline = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_PROJECT": "rf-test"}
    for key, value in {**offline, "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"

    settings = {"max_steps": 8, "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 10000}

    def build():
        set_seed(0)
        return RFSFTTrainer(
            model=build_tiny_model(tokenizer),
            args=sft_args(output_dir=str(out), report_to=["wandb", "trackio"], run_name="rf-resume", **settings),
            train_dataset=chat_data[0],
            eval_dataset=chat_data[1],
            processing_class=tokenizer,
            configs=[
                {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
                {"name": "b", "peft_config": LoraConfig(r=8, target_modules=["v_proj"]), "learning_rate": 5e-3},
            ],
            num_chunks=4,
            control_socket=False,
        )

    trainer = build()

    class CtrlC(TrainerCallback):  # b's second chunk, after checkpoints at three boundaries
        def on_step_end(self, args, state, control, **kwargs):
            if trainer.active_run.name == "b" and state.global_step == 5:
                raise KeyboardInterrupt

    trainer.add_callback(CtrlC())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()  # sends b's step 4, logged after the last checkpoint; recorded so the resume skips it
    reported = json.loads((out / "checkpoints" / "checkpoint-3" / "reported.json").read_text())
    assert reported == {"reporters": [{"b": 1}, {"b": 1}]}

    resumed = build()
    resumed.train(resume_from_checkpoint=True)
    resumed.close()
    assert [row["status"] for row in resumed.results()] == ["completed", "completed"]
    ledger = read_ledger(out / "ledger.jsonl")

    def check(got: list[tuple[int, float]], name: str, key: str) -> None:  # each step once, in order
        want = [(r["step"], r[key]) for r in ledger if r["run"] == name and r["event"] == "log" and key in r]
        assert [step for step, _ in got] == [step for step, _ in want] and want, (name, key)
        assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6), (name, key)

    # W&B, offline: the resumed part of a run is a new folder with the same run id.
    segments: dict[str, list] = {}
    for run_dir in sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*")):
        (path,) = run_dir.glob("run-*.wandb")
        records = list(wandb_records(path))
        (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
        history = [
            {wandb_key(item): json.loads(item.value_json) for item in record.history.item}
            for record in records
            if record.WhichOneof("record_type") == "history"
        ]
        segments.setdefault(run.display_name, []).append((run.run_id, history))
    assert sorted(segments) == ["a", "b"]
    for name, parts in segments.items():
        assert len(parts) == 2 and len({run_id for run_id, _ in parts}) == 1, name  # one W&B run, resumed once
        rows = [row for _, history in parts for row in history]
        for key, ledger_key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
            check([(row["_step"], row[key]) for row in rows if key in row], name, ledger_key)

    # Trackio: one run per rf run (same id before and after the resume), every step once.
    runs = trackio.Api().runs("rf-resume")
    assert sorted(run.name for run in runs) == ["a", "b"]
    for run in runs:
        logs = SQLiteStorage.get_logs("rf-resume", run.name, run_id=run.id)
        for key, ledger_key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
            check([(row["step"], row[key]) for row in logs if key in row], run.name, ledger_key)
