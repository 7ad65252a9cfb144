"""The control socket: owner-only, answers every request (valid ops, read ops, a fuzz corpus), gone after training."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import threading
import time

import pytest
from peft import LoraConfig
from transformers import set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.control.client import NoTraining, request
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger


def live_trainer(tokenizer, chat_data, sft_args, out, max_steps=400):
    set_seed(1)
    return RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=max_steps, logging_steps=5),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[
            {"name": name, "peft_config": LoraConfig(r=2, target_modules=["q_proj"])} for name in ("a", "b", "c")
        ],
        num_chunks=4,
    )


class Running:
    """Runs `trainer.train()` in a thread; on exit stops every run still going so the thread ends quickly."""

    def __init__(self, trainer, out):
        self.trainer, self.out = trainer, out
        self.thread = threading.Thread(target=trainer.train)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not (self.out / "control.sock").exists():
            assert time.time() < deadline, "the control socket never appeared"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        for run in self.trainer.runs:
            if run.status in ("pending", "running"):
                with contextlib.suppress(ValueError):  # it may have finished meanwhile
                    self.trainer.stop(run.name)
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()


def raw(path, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(str(path))
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_socket_ops_and_permissions(tokenizer, chat_data, sft_args, tmp_path):
    out = tmp_path / "out"
    trainer = live_trainer(tokenizer, chat_data, sft_args, out)
    with Running(trainer, out):
        mode = stat.S_IMODE(os.stat(out / "control.sock").st_mode)
        assert mode == 0o600, oct(mode)
        status = request(out, {"op": "status"})
        assert status["ok"] and set(status["runs"]) == {"a", "b", "c"}
        assert request(out, {"op": "stop", "run": "b", "by": "cli"}) == {"ok": True, "run": "b"}
        reply = request(out, {"op": "clone", "run": "a", "overrides": {"learning_rate": 5e-4}, "warm_start": True})
        assert reply == {"ok": True, "run": "a-clone-1"}
        assert request(out, {"op": "delete", "run": "c"}) == {"ok": True, "run": "c"}
        refused = request(out, {"op": "resume", "run": "a"})
        assert not refused["ok"] and "cannot resume run 'a'" in refused["error"]
        deadline = time.time() + 60
        while trainer.runs["b"].status != "stopped" or trainer.runs["c"].status != "deleted":
            assert time.time() < deadline
            time.sleep(0.05)
        runs = {row["name"]: row for row in request(out, {"op": "ls"})["runs"]}
        assert runs["a-clone-1"]["parent"] == "a" and runs["b"]["status"] == "stopped"
        metrics = request(out, {"op": "metrics", "run": "a", "last": 2})
        assert metrics["ok"] and len(metrics["metrics"]["a"]) <= 2
    assert not (out / "control.sock").exists(), "the socket must be removed when training ends"
    with pytest.raises(NoTraining, match="no training is running"):
        request(out, {"op": "ls"})
    ops = [r for r in read_ledger(out / "ledger.jsonl") if r["event"] == "op" and r["accepted"]]
    assert [(r["op"], r["by"]) for r in ops[:3]] == [("stop", "cli"), ("clone", "socket"), ("delete", "socket")]


FUZZ = [
    b"not json\n",
    b"\xff\xfe\x00garbage\n",
    b"[1, 2, 3]\n",
    b'"a string"\n',
    b"null\n",
    b"{}\n",
    b'{"op": 5}\n',
    b'{"op": "explode"}\n',
    b'{"op": "stop"}\n',
    b'{"op": "stop", "run": 7}\n',
    b'{"op": "stop", "run": "nobody"}\n',
    b'{"op": "stop", "run": "a", "extra": 1}\n',
    b'{"op": "clone", "run": "a", "overrides": "lr=1"}\n',
    b'{"op": "clone", "run": "a", "overrides": {"learning_rate": "fast"}}\n',
    b'{"op": "clone", "run": "a", "overrides": {"no_such_field": 1}}\n',
    b'{"op": "clone", "run": "a", "warm_start": "yes"}\n',
    b'{"op": "clone", "run": "a", "name": "../escape"}\n',
    b'{"op": "metrics", "last": -1}\n',
    b'{"op": "stop", "run": "a", "by": "a b c"}\n',
    b"[" * 100_000 + b"\n",
    b'{"op": "ls", "pad": "' + b"x" * 70_000 + b'"}\n',
]


def test_fuzz_corpus_gets_error_replies_and_changes_nothing(tokenizer, chat_data, sft_args, tmp_path):
    out = tmp_path / "out"
    trainer = live_trainer(tokenizer, chat_data, sft_args, out)
    with Running(trainer, out):
        for payload in FUZZ:
            replies = raw(out / "control.sock", payload)
            assert len(replies) == 1 and replies[0]["ok"] is False and replies[0]["error"], payload[:60]
        replies = raw(out / "control.sock", b"".join(FUZZ[:10]) + b'{"op": "status"}\n')
        assert [r["ok"] for r in replies] == [False] * 10 + [True]
        for _ in range(200):  # a burst of requests, all answered
            assert request(out, {"op": "status"})["ok"]
        assert {run.name: run.status for run in trainer.runs} == {
            "a": "running",
            "b": "running",
            "c": "running",
        } or all(run.status in ("pending", "running") for run in trainer.runs)
        assert set(trainer.runs.runs) == {"a", "b", "c"}


def test_trainer_serves_the_dashboard_while_training(tokenizer, chat_data, sft_args, tmp_path, capsys):
    import re
    import urllib.error
    import urllib.request

    from transformers import TrainerCallback

    trainer = live_trainer(tokenizer, chat_data, sft_args, tmp_path / "out", max_steps=6)
    trainer._rf_setup = dataclasses.replace(trainer._rf_setup, dashboard=True)  # as RFSFTTrainer(dashboard=True)
    seen = {}

    class Fetch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if "status" not in seen:
                printed = capsys.readouterr().out
                seen["url"] = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/\?token=\S+)", printed).group(1)
                with urllib.request.urlopen(seen["url"], timeout=10) as page:
                    seen["status"], seen["html"] = page.status, page.read().decode()

    trainer.add_callback(Fetch())
    trainer.train()
    assert seen["status"] == 200 and "<html" in seen["html"].lower()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(seen["url"], timeout=2)
