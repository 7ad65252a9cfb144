"""Reliability under hostile use: request floods, ops on deleted runs, another OS user, and a soak of 200 random
valid IC ops during a 6-run training that must leave a state consistent with the ledger and no leaked adapters."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from peft import LoraConfig
from test_control import Running, live_trainer, raw
from transformers import TrainerCallback

from rf_callbacks import RFSFTTrainer
from rf_callbacks.control.client import request
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger
from rf_callbacks.ops import OpError


def test_request_flood_and_ops_on_deleted_runs(tokenizer, chat_data, sft_args, tmp_path):
    out = tmp_path / "out"
    trainer = live_trainer(tokenizer, chat_data, sft_args, out)
    with Running(trainer, out):
        started = time.perf_counter()
        replies = raw(out / "control.sock", b'{"op": "status"}\n' * 3000)  # one pipelined connection
        answered = [threading.Thread(target=lambda: [request(out, {"op": "ls"}) for _ in range(100)])]
        answered += [threading.Thread(target=lambda: [request(out, {"op": "status"}) for _ in range(100)])]
        for thread in answered:
            thread.start()
        for thread in answered:
            thread.join()
        rate = (3000 + 200) / (time.perf_counter() - started)
        assert len(replies) == 3000 and all(reply["ok"] for reply in replies)
        assert rate > 300, f"{rate:.0f} requests/s"
        assert request(out, {"op": "delete", "run": "c"})["ok"]
        for kind in ("stop", "resume", "delete", "clone"):
            reply = request(out, {"op": kind, "run": "c"})
            assert not reply["ok"] and f"cannot {kind} run 'c': it is deleted" in reply["error"], reply
        assert set(trainer.runs.runs) == {"a", "b", "c"}


SYSTEM_PYTHON = "/usr/bin/python3"
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("SOCKET")
except PermissionError:
    print("connect refused")
    sys.exit()
try:
    s.sendall(b'{"op": "delete", "run": "a"}\\n')
except OSError:
    pass  # the server may have answered and closed already
print(s.recv(4096).decode())
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to act as a second OS user) and python3",
)
def test_another_os_user_is_refused(tokenizer, chat_data, sft_args):
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)  # let the other user reach the socket file, so the server's own check is what refuses
    try:
        out = folder / "out"
        trainer = live_trainer(tokenizer, chat_data, sft_args, out)
        with Running(trainer, out):
            out.chmod(0o755)
            probe = PROBE.replace("SOCKET", str(out / "control.sock"))
            as_nobody = {"user": 65534, "capture_output": True, "text": True, "timeout": 60, "cwd": "/"}
            python = SYSTEM_PYTHON  # the probe needs only the standard library, from a python the other user can run
            assert subprocess.run([python, "-c", probe], **as_nobody).stdout.strip() == "connect refused"
            (out / "control.sock").chmod(0o666)  # even with the file open to all, the peer's uid is checked
            reply = subprocess.run([python, "-c", probe], **as_nobody)
            assert "permission denied: not the owner of this training" in reply.stdout, reply.stderr
            assert trainer.runs["a"].status in ("pending", "running")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_soak_200_random_ops_during_a_6_run_training(tokenizer, chat_data, sft_args, tmp_path):
    model = build_tiny_model(tokenizer)
    base_parameters = sum(p.numel() for p in model.parameters())
    trainer = RFSFTTrainer(
        model=model,
        args=sft_args(output_dir=str(tmp_path), max_steps=60, logging_steps=5),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[
            {"name": f"r{i}", "peft_config": LoraConfig(r=2 + i, target_modules=["q_proj", "v_proj"])}
            for i in range(6)
        ],
        num_chunks=4,
        control_socket=False,
    )
    rng = random.Random(0)
    accepted, refused = [], 0

    def storm():
        nonlocal refused
        while len(accepted) < 200:
            runs = list(trainer.runs)
            run = rng.choice(runs)
            kind = rng.choice(["stop", "resume", "delete", "clone", "clone", "resume"])
            try:
                if kind == "clone":
                    name = trainer.clone(run.name, {"learning_rate": rng.choice([1e-3, 2e-3])}, rng.random() < 0.5)
                else:
                    name = getattr(trainer, kind)(run.name)
                accepted.append((kind, name))
            except OpError:
                refused += 1
            time.sleep(rng.uniform(0, 0.01))

    thread = threading.Thread(target=storm)
    thread.start()
    while thread.is_alive():  # keep training while the storm lasts: resume what it stopped, train again
        trainer.train()
        for run in trainer.runs:
            if run.status == "stopped" and thread.is_alive():
                with contextlib.suppress(OpError):  # the storm may have deleted it meanwhile
                    trainer.resume(run.name)
    thread.join()
    trainer.train()
    assert len(accepted) == 200 and refused > 0
    kinds = {kind: sum(k == kind for k, _ in accepted) for kind in ("stop", "resume", "delete", "clone")}
    print(f"soak: 200 ops accepted {kinds}, {refused} refused, {len(trainer.runs)} runs in the end")

    # Every accepted op was applied or skipped (its run had changed status), each exactly once.
    records = read_ledger(tmp_path / "ledger.jsonl")
    issued = [r for r in records if r["event"] == "op" and r["accepted"]]
    done = [r for r in records if r["event"] in ("op_applied", "op_skipped")]
    assert len(issued) >= 200 and len(done) == len(issued)
    # The final statuses are the last ones the ledger recorded.
    last = {r["run"]: r["status"] for r in records if r["event"] == "status"}
    assert {run.name: run.status for run in trainer.runs} == last
    # No leaked adapters or optimizers: only runs that are not deleted hold them; deleting all of them gets the
    # model back to its base parameters.
    alive = {run.spec.adapter_name for run in trainer.runs if run.status != "deleted"}
    assert set(trainer.model.peft_config) == alive
    for run in list(trainer.runs):
        if run.status != "deleted":
            trainer.delete(run.name)
    assert not trainer.model.peft_config or set(trainer.model.peft_config) == set()
    assert sum(p.numel() for p in trainer.model.parameters()) == base_parameters
    assert not trainer.accelerator._optimizers


def test_a_clone_whose_adapter_cannot_be_built_fails_alone(tokenizer, chat_data, sft_args, tmp_path):
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(tmp_path), max_steps=6),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[{"name": n, "peft_config": LoraConfig(r=2, target_modules=["q_proj"])} for n in ("a", "b")],
        num_chunks=2,
        control_socket=False,
    )

    def out_of_memory(*args, **kwargs):  # fault injection: what a full GPU does to a new adapter
        raise RuntimeError("CUDA out of memory (injected)")

    trainer.model.add_adapter = out_of_memory
    child = trainer.clone("a", {"learning_rate": 1e-4})
    del trainer.model.add_adapter
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows[child]["status"] == "failed"
    assert rows[child]["error"] == "adapter could not be built: RuntimeError: CUDA out of memory (injected)"
    assert rows["a"]["status"] == rows["b"]["status"] == "completed"
    assert child not in trainer.model.peft_config
    status = [r for r in read_ledger(tmp_path / "ledger.jsonl") if r["event"] == "status" and r["run"] == child]
    assert status[-1]["status"] == "failed" and "injected" in status[-1]["error"]


class RaiseAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"boom at {self.step}")


def test_an_error_with_one_run_propagates_and_the_run_ends_failed(tokenizer, chat_data, sft_args, tmp_path):
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer), args=sft_args(output_dir=str(tmp_path), max_steps=6),
        train_dataset=chat_data[0], processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]), callbacks=[RaiseAt(2)], control_socket=False,
        configs=[{}],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom at 2"):
        trainer.train()
    (row,) = trainer.results()
    assert row["status"] == "failed" and row["error"] == "RuntimeError: boom at 2" and row["global_step"] == 2
    status = [r for r in read_ledger(tmp_path / "ledger.jsonl") if r["event"] == "status"]
    assert [r["status"] for r in status] == ["running", "failed"]
    assert json.loads((tmp_path / "runs" / "run-1" / "run.json").read_text())["status"] == "failed"


def test_an_evaluation_that_fails_at_a_boundary_fails_its_run_alone(tokenizer, chat_data, sft_args, tmp_path):
    def compute_metrics(prediction):
        if trainer.runs["bad"] is trainer.active_run:
            raise ValueError("metric broke")
        return {"rows": float(len(prediction.label_ids))}

    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer), args=sft_args(output_dir=str(tmp_path), max_steps=24),
        train_dataset=chat_data[0], eval_dataset=chat_data[1], processing_class=tokenizer,
        configs=[{"name": n, "peft_config": LoraConfig(r=2, target_modules=["q_proj"])} for n in ("bad", "good")],
        num_chunks=2, compute_metrics=compute_metrics, control_socket=False,
    )  # fmt: skip
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error"] == "ValueError: metric broke"
    assert rows["good"]["status"] == "completed" and rows["good"]["global_step"] == 24
    assert [e["eval_rows"] for e in trainer.runs["good"].state.log_history if "eval_rows" in e] == [16.0, 16.0]
