"""IC ops from Python: stop/resume exactly, delete frees memory, clone (warm start), validation and the ledger."""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import TrainerCallback, set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger
from rf_callbacks.ops import OpError


def configs():
    return [
        {"name": "a", "peft_config": LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])},
        {
            "name": "b",
            "peft_config": LoraConfig(r=8, lora_dropout=0.1, target_modules="all-linear"),
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 8,
        },
        {"name": "c", "peft_config": LoraConfig(r=2, lora_dropout=0.1, target_modules=["o_proj"])},
    ]


def make_trainer(tokenizer, chat_data, sft_args, out, **kwargs):
    set_seed(7)
    return RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), max_steps=kwargs.pop("max_steps", 10)),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=kwargs.pop("configs", None) or configs(),
        num_chunks=3,
        **kwargs,
    )


def weights(trainer, name):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model, adapter_name=name).items()}


def same(left, right):
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


class OpAt(TrainerCallback):
    """Issues `action(trainer)` once, when run `name` ends optimizer step `step`."""

    def __init__(self, trainer, name, step, action):
        self.trainer, self.name, self.step, self.action, self.done = trainer, name, step, action, False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.done and self.trainer.active_run.name == self.name and state.global_step == self.step:
            self.done = True
            self.action(self.trainer)


@pytest.fixture
def reference(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "reference")
    trainer.train()
    return {name: weights(trainer, name) for name in ("a", "b", "c")}


def test_stop_mid_chunk_then_resume_is_exact(reference, tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "stopped")
    trainer.add_callback(OpAt(trainer, "b", 2, lambda t: t.stop("b")))  # b's chunks are 4 steps: 2 is mid-chunk
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["b"]["status"] == "stopped" and rows["b"]["global_step"] == 2
    assert rows["a"]["status"] == rows["c"]["status"] == "completed"
    assert same(weights(trainer, "a"), reference["a"]) and same(weights(trainer, "c"), reference["c"])

    trainer.resume("b")
    assert trainer.runs["b"].status == "running"
    trainer.train()
    assert trainer.runs["b"].status == "completed" and trainer.runs["b"].global_step == 10
    assert same(weights(trainer, "b"), reference["b"])
    ops = [(r["op"], r["target"], r["event"]) for r in read_ledger(tmp_path / "stopped" / "ledger.jsonl") if "op" in r]
    assert ops == [
        ("stop", "b", "op"),
        ("stop", "b", "op_applied"),
        ("resume", "b", "op"),
        ("resume", "b", "op_applied"),
    ]


def test_stop_from_another_thread_while_training(reference, tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "threaded", max_steps=10)

    def stop_when_started():
        while trainer.runs["c"].global_step < 1:
            time.sleep(0.005)
        trainer.stop("c")

    thread = threading.Thread(target=stop_when_started)
    thread.start()
    trainer.train()
    thread.join()
    assert trainer.runs["c"].status == "stopped"
    trainer.resume("c")
    trainer.train()
    assert same(weights(trainer, "c"), reference["c"])


def test_delete_frees_the_adapter_and_optimizer(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "deleted")
    seen = {}

    def delete_b(t):
        seen["params"] = sum(p.numel() for p in t.model.parameters())
        seen["optimizer"] = weakref.ref(t.optimizer.optimizer)
        t.delete("b")

    trainer.add_callback(OpAt(trainer, "b", 3, delete_b))
    trainer.train()
    gc.collect()
    assert trainer.runs["b"].status == "deleted" and "b" not in trainer.model.peft_config
    assert sum(p.numel() for p in trainer.model.parameters()) < seen["params"]
    assert seen["optimizer"]() is None, "the deleted run's optimizer is still referenced"
    assert trainer.runs["a"].status == trainer.runs["c"].status == "completed"
    info = json.loads((tmp_path / "deleted" / "runs" / "b" / "run.json").read_text())
    assert info["status"] == "deleted" and info["global_step"] == 3


def test_clone_with_warm_start_after_training(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "cloned", configs=configs()[:1])
    trainer.train()
    child = trainer.clone("a", {"learning_rate": 5e-4}, warm_start=True)
    assert child == "a-clone-1"
    assert same(weights(trainer, child), weights(trainer, "a"))
    run = trainer.runs[child]
    assert run.status == "pending" and run.spec.parent == "a" and run.args.learning_rate == 5e-4
    assert run.plan.start_slice == trainer.runs["a"].next_slice  # continues on the data after the parent's chunks
    trainer.train()
    row = next(r for r in trainer.results() if r["name"] == child)
    assert row["status"] == "completed" and row["global_step"] == 10 and row["parent"] == "a"
    assert row["config"]["warm_start"] is True
    assert json.loads((tmp_path / "cloned" / "runs" / child / "run.json").read_text())["parent"] == "a"


def test_live_clone_joins_the_rotation(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "live")
    names = []
    trainer.add_callback(
        OpAt(trainer, "a", 4, lambda t: names.append(t.clone("a", {"peft_config.lora_dropout": 0.0}, name="a2")))
    )
    trainer.train()
    assert names == ["a2"]
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a2"]["status"] == "completed" and rows["a2"]["parent"] == "a"
    assert trainer.model.peft_config["a2"].lora_dropout == 0.0
    statuses = [(r["run"], r.get("parent")) for r in read_ledger(tmp_path / "live" / "ledger.jsonl")
                if r["event"] == "status" and r["status"] == "pending"]  # fmt: skip
    assert statuses == [("a2", "a")]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.stop("zzz"), "unknown run 'zzz'"),
        (lambda t: t.resume("a"), "cannot resume run 'a': it is pending"),
        (lambda t: t.clone("a", {"learing_rate": 1.0}), "did you mean 'learning_rate'"),
        (lambda t: t.clone("a", {"learning_rate": -1.0}), "learning_rate=-1.0 is invalid"),
        (lambda t: t.clone("a", {"bf16": True}), "cannot differ per run"),
        (lambda t: t.clone("a", {"peft_config.rank": 4}), "unknown peft_config field(s) ['rank']"),
        (lambda t: t.clone("a", {"peft_config.r": 16}, warm_start=True), "r changes from 4 to 16"),
        (lambda t: t.clone("a", {"peft_config.r": 0}), "override r=0; it must be an int >= 1"),
        (lambda t: t.clone("a", {"peft_config.r": "x"}), "override r='x'; it must be an int >= 1"),
        (lambda t: t.clone("a", {"peft_config": {"lora_dropout": 2.0}}), "lora_dropout=2.0; it must be in [0, 1)"),
        (lambda t: t.clone("a", {"peft_config.target_modules": ["nope_proj"]}), "no module of the model matches"),
        (lambda t: t.clone("a", name="b"), "a run named 'b' already exists"),
        (lambda t: t.clone("a", copy_optimizer=True), "copy_optimizer=True needs warm_start=True"),
    ],
)
def test_bad_ops_are_refused(tokenizer, chat_data, sft_args, tmp_path, call, message):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "bad")
    with pytest.raises(OpError) as error:
        call(trainer)
    assert message in str(error.value)
    refused = [r for r in read_ledger(tmp_path / "bad" / "ledger.jsonl") if r["event"] == "op"]
    assert refused and refused[-1]["accepted"] is False


def test_ops_on_finished_runs_are_refused(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "done", configs=configs()[:1], max_steps=4)
    trainer.train()
    with pytest.raises(OpError, match="cannot stop run 'a': it is completed"):
        trainer.stop("a")


def test_clone_can_copy_the_parents_optimizer(tokenizer, chat_data, sft_args, tmp_path):
    trainer = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "copied", configs=configs()[:1], max_steps=6)
    trainer.train()
    parent_state = trainer.runs["a"].attributes["optimizer"].state_dict()
    child = trainer.clone("a", {"learning_rate": 7e-4}, warm_start=True, copy_optimizer=True)
    trainer.select_run(child)  # builds its optimizer and scheduler, as its first slice would
    state = trainer.optimizer.state_dict()
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in state["state"].values()]
    expected = [(s["exp_avg"], s["exp_avg_sq"]) for s in parent_state["state"].values()]
    assert moments and all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(moments, expected))
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [7e-4] * len(trainer.optimizer.param_groups)
    trainer.train()
    assert trainer.runs[child].status == "completed"
