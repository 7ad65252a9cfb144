"""Drive a live 3-run training through the `rf-callbacks` CLI: stop, clone with warm start, delete."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import torch
from peft import LoraConfig
from transformers import TrainerCallback, set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.applying import OpApplier
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rf_callbacks.cli", *args], capture_output=True, text=True, env=env)


class FirstWeights(TrainerCallback):
    """Records each run's adapter as it starts training (before its first step)."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def on_train_begin(self, args, state, control, **kwargs):
        run = self.trainer.active_run
        self.weights[run.name] = {n: p.detach().clone() for n, p in zip(run.trainable_names, run.trainable)}


def test_cli_steers_a_live_training(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    out = tmp_path / "out"
    used = {}
    warm_start = OpApplier._warm_start

    def record(self, parent, spec):
        used["parent"] = {k: v.clone() for k, v in parent.boundary_weights.items()}
        warm_start(self, parent, spec)

    monkeypatch.setattr(OpApplier, "_warm_start", record)
    set_seed(2)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=240, logging_steps=5),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=[{"name": n, "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])} for n in "abc"],
        num_chunks=4,
    )
    first = FirstWeights(trainer)
    trainer.add_callback(first)
    thread = threading.Thread(target=trainer.train)
    thread.start()
    while not (out / "control.sock").exists():
        time.sleep(0.02)
    assert stat.S_IMODE(os.stat(out / "control.sock").st_mode) == 0o600

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    watch = subprocess.Popen(
        [sys.executable, "-m", "rf_callbacks.cli", "watch", "--dir", str(out), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    started = time.perf_counter()
    listing = cli("ls", "--dir", str(out))
    assert listing.returncode == 0 and "run" in listing.stdout and "a" in listing.stdout
    assert time.perf_counter() - started < 5
    assert cli("stop", "--dir", str(out), "b").returncode == 0
    clone = cli("clone", "--dir", str(out), "a", "--set", "learning_rate=5e-4", "--warm-start", "--name", "a-lr")
    assert clone.returncode == 0, clone.stderr
    assert cli("delete", "--dir", str(out), "c").returncode == 0
    refused = cli("resume", "--dir", str(out), "a")
    assert refused.returncode != 0 and "cannot resume run 'a'" in refused.stderr
    thread.join(timeout=300)
    assert not thread.is_alive()

    statuses = {row["name"]: row["status"] for row in trainer.results()}
    assert statuses == {"a": "completed", "b": "stopped", "c": "deleted", "a-lr": "completed"}
    child = trainer.runs["a-lr"]
    assert child.spec.parent == "a" and child.args.learning_rate == 5e-4
    assert all(
        torch.equal(first.weights["a-lr"][name.replace(".a.", ".a-lr.")], value)
        for name, value in used["parent"].items()
    )
    records = read_ledger(out / "ledger.jsonl")
    applied = [(r["op"], r["target"], r["by"]) for r in records if r["event"] == "op_applied"]
    assert applied == [("stop", "b", "cli"), ("clone", "a", "cli"), ("delete", "c", "cli")]
    assert not (out / "control.sock").exists()
    watched, complaints = watch.communicate(timeout=30)
    assert watch.returncode == 0, complaints
    assert "a-lr" in watched and watched.rstrip().endswith("training ended")
    after = cli("stop", "--dir", str(out), "a")
    assert after.returncode != 0 and "no training is running" in after.stderr
