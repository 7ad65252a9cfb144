"""`oom_retry=True`: a run whose step runs out of memory goes on from that optimizer step with half the micro-batch and
twice the gradient accumulation, once; the others are untouched. Out-of-memory errors are injected on CPU by making
one run's `training_step` raise `torch.OutOfMemoryError` in the middle of an optimizer step (after one of its
micro-batches has added its gradients, loss and metrics)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed

from rf_callbacks import RFGRPOTrainer, RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger

CONFIGS = [
    {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
    {
        "name": "b",
        "peft_config": LoraConfig(r=8, target_modules=["v_proj", "o_proj"]),
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
    },
]


def build(tokenizer, chat_data, sft_args, out, **kwargs):
    set_seed(7)
    settings = {"max_steps": 12, "save_strategy": "steps", "save_steps": 10000, **kwargs.pop("args", {})}
    return RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=sft_args(output_dir=str(out), **settings),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=CONFIGS,
        num_chunks=3,
        control_socket=False,
        **kwargs,
    )


def inject_oom(trainer, run: str, at_steps: tuple[int, ...]) -> dict[str, list]:
    """Make `run`'s second micro-batch of optimizer step `s + 1` raise, for each `s` in `at_steps`, once each.
    Returns the lengths of TRL's train metric buffers as the error is raised and as the step starts again."""
    original, calls, done, buffers = trainer.training_step, {}, set(), {"raised": [], "again": []}

    def training_step(*args, **kwargs):
        step = trainer.state.global_step
        lengths = {key: len(values) for key, values in trainer._metrics["train"].items()}
        if trainer.active_run.name == run and step in at_steps:
            calls[step] = calls.get(step, 0) + 1
            if calls[step] == 2:
                done.add(step)
                buffers["raised"].append(lengths)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            if calls[step] == 3:
                buffers["again"].append(lengths)
        return original(*args, **kwargs)

    trainer.training_step = training_step
    return buffers


def adapters(out):
    return {name: load_file(out / "runs" / name / "adapter_model.safetensors") for name in ("a", "b")}


def losses(out, name, key="loss"):
    return [(r["step"], r[key]) for r in read_ledger(out / "ledger.jsonl") if r["run"] == name and key in r]


@pytest.fixture(scope="module")
def reference(tokenizer, chat_data, tmp_path_factory):
    """The experiment with no fault."""
    from helpers import cpu_sft_config

    out = tmp_path_factory.mktemp("reference")
    build(tokenizer, chat_data, lambda **o: cpu_sft_config(o.pop("output_dir"), **o), out).train()
    return out


def test_a_run_that_runs_out_of_memory_goes_on_with_half_the_micro_batch(
    tokenizer, chat_data, sft_args, tmp_path, reference
):
    out = tmp_path / "retry"
    trainer = build(tokenizer, chat_data, sft_args, out, oom_retry=True)
    buffers = inject_oom(trainer, "b", at_steps=(4,))
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a"]["status"] == rows["b"]["status"] == "completed"
    # What the first micro-batch of the failed step appended (its token accuracy, entropy) was taken back.
    (raised,), (again,) = buffers["raised"], buffers["again"]
    assert raised["mean_token_accuracy"] == 1 and again.get("mean_token_accuracy", 0) == 0
    assert rows["b"]["global_step"] == 12 and rows["a"]["oom_retry"] is None
    retry = rows["b"]["oom_retry"]
    assert retry == {
        "step": 5,
        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected)",
        "per_device_train_batch_size": [4, 2],
        "gradient_accumulation_steps": [2, 4],
    }
    b = trainer.runs["b"]
    assert (b.args.per_device_train_batch_size, b.args.gradient_accumulation_steps) == (2, 4)
    assert (b.plan.batch_size, b.plan.grad_accum, b.plan.steps_per_epoch) == (2, 4, 12)
    assert json.loads((out / "runs" / "b" / "run.json").read_text())["oom_retry"] == retry
    ledger = read_ledger(out / "ledger.jsonl")
    (event,) = [r for r in ledger if r["event"] == "oom_retry"]
    assert (event["run"], event["step"], event["per_device_train_batch_size"]) == ("b", 4, 2)
    assert "out of memory" in event["reason"]

    # Run a is untouched, bit for bit; run b redid step 5 from where step 4 left it, in micro-batches of 2: the same
    # rows per step, so the same trajectory up to float summation order and padding.
    expected, got = adapters(reference), adapters(out)
    assert all(torch.equal(expected["a"][k], got["a"][k]) for k in expected["a"])
    assert losses(out, "a") == losses(reference, "a")
    assert [step for step, _ in losses(out, "b")] == list(range(1, 13))  # each step logged once
    assert losses(out, "b")[:4] == losses(reference, "b")[:4]
    for key in ("loss", "num_tokens"):  # (token accuracy is a mean over micro-batches: it changes with their size)
        got_values, expected_values = losses(out, "b", key), losses(reference, "b", key)
        assert len(got_values) == len(expected_values) == 12, key
        assert [value for _, value in got_values] == pytest.approx([value for _, value in expected_values], 1e-4)
    for key in expected["b"]:
        assert torch.allclose(expected["b"][key], got["b"][key], rtol=1e-3, atol=1e-5), key
    assert any(not torch.equal(expected["b"][k], got["b"][k]) for k in expected["b"])  # it did take the other path


def test_a_retried_run_resumes_from_a_checkpoint_with_its_halved_micro_batch(tokenizer, chat_data, sft_args, tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    trainer = build(tokenizer, chat_data, sft_args, uninterrupted, oom_retry=True)
    inject_oom(trainer, "b", at_steps=(4,))
    trainer.train()

    trainer = build(tokenizer, chat_data, sft_args, interrupted, oom_retry=True)
    inject_oom(trainer, "b", at_steps=(4,))

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer.active_run.name == "b" and state.global_step == 10:
                raise KeyboardInterrupt

    trainer.add_callback(CtrlC())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    resumed = build(tokenizer, chat_data, sft_args, interrupted, oom_retry=True)
    resumed.train(resume_from_checkpoint=True)
    b = resumed.runs["b"]
    assert (b.args.per_device_train_batch_size, b.plan.grad_accum, b.oom_retry["step"]) == (2, 4, 5)
    expected, got = adapters(uninterrupted), adapters(interrupted)
    for name in expected:
        assert all(torch.equal(expected[name][k], got[name][k]) for k in expected[name]), name
    assert losses(interrupted, "b") == losses(uninterrupted, "b")


def test_without_oom_retry_or_after_one_retry_the_run_fails_with_the_reason(tokenizer, chat_data, sft_args, tmp_path):
    trainer = build(tokenizer, chat_data, sft_args, tmp_path / "off")
    inject_oom(trainer, "b", at_steps=(4,))
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a"]["status"] == "completed"
    assert rows["b"]["status"] == "failed" and rows["b"]["oom_retry"] is None
    assert rows["b"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
    assert all(p.grad is None for p in trainer.runs["b"].trainable)  # freed

    trainer = build(tokenizer, chat_data, sft_args, tmp_path / "twice", oom_retry=True)
    inject_oom(trainer, "b", at_steps=(4, 7))
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a"]["status"] == "completed" and rows["b"]["status"] == "failed"
    assert rows["b"]["global_step"] == 7 and rows["b"]["oom_retry"]["step"] == 5
    assert rows["b"]["error"] == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected) (again after the retry at step 5)"
    )
    info = json.loads((tmp_path / "twice" / "runs" / "b" / "run.json").read_text())
    assert info["status"] == "failed" and info["oom_retry"]["per_device_train_batch_size"] == [4, 2]


def test_oom_retry_is_refused_where_it_cannot_work(tokenizer, chat_data, sft_args, tmp_path):
    with pytest.raises(ValueError, match="oom_retry='yes' is invalid; use True or False"):
        build(tokenizer, chat_data, sft_args, tmp_path, oom_retry="yes")
    with pytest.raises(ValueError, match="RFGRPOTrainer cannot retry a step that ran out of memory yet"):
        RFGRPOTrainer(model=build_tiny_model(tokenizer), reward_funcs=[len], oom_retry=True)


def test_a_dpo_run_that_runs_out_of_memory_goes_on_with_half_the_micro_batch(make_model, tokenizer, tmp_path):
    from peft import get_peft_model_state_dict
    from test_dpo import dpo_config

    from rf_callbacks import RFDPOTrainer
    from rf_callbacks.preference import load_preferences

    train = load_preferences(conversational=True).select(range(48))
    configs = [
        {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])},
        {"name": "b", "peft_config": LoraConfig(r=2, target_modules=["v_proj"]), "learning_rate": 3e-3,
         "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    ]  # fmt: skip
    trained = {}
    for label, retry in (("reference", False), ("retry", True)):
        set_seed(7)
        trainer = RFDPOTrainer(
            model=make_model(), args=dpo_config(tmp_path / label, max_steps=8), train_dataset=train,
            processing_class=tokenizer, configs=configs, num_chunks=2, control_socket=False, oom_retry=retry,
        )  # fmt: skip
        if retry:
            inject_oom(trainer, "b", at_steps=(2,))
        trainer.train()
        weights = {name: get_peft_model_state_dict(trainer.model, adapter_name=name) for name in ("a", "b")}
        trained[label] = trainer, weights
    (reference, expected), (trainer, got) = trained["reference"], trained["retry"]
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a"]["status"] == rows["b"]["status"] == "completed" and rows["b"]["global_step"] == 8
    assert rows["b"]["oom_retry"]["gradient_accumulation_steps"] == [2, 4]
    assert all(torch.equal(expected["a"][k], got["a"][k]) for k in expected["a"])
    assert all(torch.allclose(expected["b"][k], got["b"][k], rtol=1e-3, atol=1e-5) for k in expected["b"])
    steps = [entry["step"] for entry in trainer.runs["b"].state.log_history if "loss" in entry]
    assert steps == list(range(1, 9))
    reference_losses = [e["loss"] for e in reference.runs["b"].state.log_history if "loss" in e]
    losses = [e["loss"] for e in trainer.runs["b"].state.log_history if "loss" in e]
    assert losses == pytest.approx(reference_losses, rel=1e-4)
