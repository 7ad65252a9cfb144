"""The offline demo assets: bundled data, tokenizer, tiny model, and the ledger plot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from rf_callbacks import demo
from rf_callbacks.plotting import _read_ledger, plot_ledger

DATA_DIR = Path(str(resources.files("rf_callbacks") / "data"))
CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "Thanks."},
]


def test_bundled_data_loads():
    dataset = demo.load_instructions()
    assert dataset.column_names == ["instruction", "response"]
    assert 400 <= len(dataset) <= 600
    assert all(row["instruction"].strip() and row["response"].strip() for row in dataset)
    assert len(set(dataset["instruction"])) == len(dataset)
    assert (DATA_DIR / "instructions.jsonl").stat().st_size < 150_000


@pytest.mark.parametrize("name", ["instructions", "preferences"])
def test_generator_rewrites_bundled_file_byte_identically(tmp_path, name):
    """Each generator, run as the script it is (`python make_<name>.py out.jsonl`), rewrites its bundled file."""
    script = DATA_DIR / f"make_{name}.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "out.jsonl")], check=True, cwd=tmp_path)
    assert (tmp_path / "out.jsonl").read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes()


def test_to_chat_and_split():
    row = {"instruction": "Reverse the word cat.", "response": "tac", "extra": 1}
    assert demo.to_chat(row) == {
        "prompt": [{"role": "user", "content": "Reverse the word cat."}],
        "completion": [{"role": "assistant", "content": "tac"}],
    }
    train, val = demo.demo_datasets()
    assert train.column_names == val.column_names == ["prompt", "completion"]
    assert len(train) + len(val) == len(demo.load_instructions())
    assert len(val) == round(0.1 * (len(train) + len(val)))
    prompts = {r["prompt"][0]["content"] for r in train}
    assert prompts.isdisjoint(r["prompt"][0]["content"] for r in val)
    again, _ = demo.demo_datasets()
    assert again[:5] == train[:5]
    assert demo.demo_datasets(seed=1)[0][:5] != train[:5]
    with pytest.raises(ValueError, match="eval_fraction"):
        demo.demo_datasets(eval_fraction=1.0)


def test_tokenizer_is_deterministic_and_round_trips():
    # Clearing the cache makes the second build retrain from scratch instead of reusing the first's result.
    demo._trained_tokenizer_json.cache_clear()
    first = demo.build_tokenizer()
    demo._trained_tokenizer_json.cache_clear()
    second = demo.build_tokenizer()
    assert first is not second
    assert first.get_vocab() == second.get_vocab()
    assert len(first) == 1024
    text = 'Sort these numbers: 9, 2, 7. Write "ünïcode 🙂" in uppercase.'
    assert first(text)["input_ids"] == second(text)["input_ids"]
    assert first.decode(first(text)["input_ids"]) == text
    assert (first.pad_token, first.bos_token, first.eos_token) == ("<|pad|>", "<|bos|>", "<|im_end|>")
    assert len({first.pad_token_id, first.bos_token_id, first.eos_token_id}) == 3


def test_chat_template_marks_assistant_turn_and_stop_token():
    tokenizer = demo.build_tokenizer()
    # The same pattern TRL's `has_generation_markers` looks for.
    assert re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "<|bos|><|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
    )
    out = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert any(mask)
    # What `assistant_only_loss=True` trains: the answer and the end-of-turn token, nothing else (TRL's
    # `is_chat_template_stop_token_trained` wants the last masked token to be that added token).
    trained = [token for token, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(trained) == "2 + 3 = 5.<|im_end|>"
    assert trained[-1] == tokenizer.eos_token_id


def test_generation_prompt_is_a_prefix_of_the_conversation():
    tokenizer = demo.build_tokenizer()
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(CHAT[:2], tokenize=True, return_dict=False)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert full[: len(prompt)] == prompt


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    tokenizer = demo.build_tokenizer()
    rng_before = torch.get_rng_state()
    model = demo.build_tiny_model(tokenizer, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    same = demo.build_tiny_model(tokenizer, seed=0)
    other = demo.build_tiny_model(tokenizer, seed=1)
    state, same_state, other_state = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same_state[k]) for k in state)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[key], other_state[key])

    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names

    batch = tokenizer(["What is 2 + 3?", "Hi"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        again = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, again)


def test_building_tokenizer_and_model_is_fast():
    demo.tiny_model_and_tokenizer()  # imports transformers' Llama modules, which is not what this measures
    demo._trained_tokenizer_json.cache_clear()
    start = time.perf_counter()
    model, tokenizer = demo.tiny_model_and_tokenizer()
    assert time.perf_counter() - start < 2.0
    assert model.config.vocab_size == len(tokenizer)


def _write_ledger(path: Path, lines: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def _synthetic_ledger(path: Path) -> Path:
    lines: list = []
    for run, scale in (("r8-lr1e-3", 1.0), ("r16-lr1e-4", 1.3)):
        for step in range(1, 41):
            chunk = (step - 1) // 10
            lines.append({"time": 1732800000.0 + step, "run": run, "step": step, "chunk": chunk, "event": "log",
                          "loss": scale * (3.0 - 0.04 * step), "learning_rate": 1e-3, "grad_norm": 0.5})  # fmt: skip
            if step % 10 == 0:
                lines.append({"run": run, "step": step, "chunk": chunk, "event": "log", "eval_loss": scale * 2.5})
            if step % 10 == 0 and step < 40:  # as the trainer writes them: the step where the chunk ended
                lines.append({"run": run, "step": step, "chunk": chunk + 1, "event": "boundary"})
    lines += [
        {"run": "r8-lr1e-3", "step": 40, "chunk": 3, "event": "status", "status": "completed"},
        {"run": "r8-lr1e-3", "step": 40, "chunk": 3, "event": "op", "op": "clone"},  # unknown event: ignored
        {"run": "lonely", "step": 5, "chunk": 0, "event": "log", "loss": 2.0},  # a single point still gets a line
        {"run": "diverged", "step": 3, "chunk": 0, "event": "log", "loss": float("nan")},
        '{"run": "r8-lr1e-3", "step": 41, "event": "log", "loss"',  # cut by a crash
        "[1, 2, 3]",
    ]
    return _write_ledger(path, lines)


def test_read_ledger_finds_points_and_chunk_boundaries(tmp_path):
    series, boundaries, runs = _read_ledger(_synthetic_ledger(tmp_path / "ledger.jsonl"), ["loss", "eval_loss"])
    assert runs == ["r8-lr1e-3", "r16-lr1e-4", "lonely", "diverged"]
    assert len(series["loss"]["r8-lr1e-3"]) == 40
    assert series["loss"]["lonely"] == {5: 2.0}
    assert "diverged" not in series["loss"]
    assert sorted(series["eval_loss"]["r16-lr1e-4"]) == [10, 20, 30, 40]
    assert boundaries["r8-lr1e-3"] == [10, 20, 30]


def test_plot_ledger_writes_png(tmp_path):
    ledger = _synthetic_ledger(tmp_path / "ledger.jsonl")
    out = plot_ledger(ledger, tmp_path / "plots" / "loss.png", metrics=("loss", "eval_loss", "missing"), title="t")
    assert out == tmp_path / "plots" / "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temp file left behind


def test_plot_ledger_without_data_raises(tmp_path):
    empty = _write_ledger(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl"):
        plot_ledger(empty, tmp_path / "x.png")
    status_only = _write_ledger(
        tmp_path / "status.jsonl", [{"run": "a", "step": 1, "chunk": 0, "event": "status", "status": "running"}]
    )
    with pytest.raises(ValueError, match="status.jsonl"):
        plot_ledger(status_only, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
