"""Shared fixtures: the embedded tiny Llama and tokenizer, small slices of the bundled data, CPU-friendly args."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tokenizer():
    from rf_callbacks.demo import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    """A fresh, identical tiny Llama on every call (weights depend only on the seed)."""
    from rf_callbacks.demo import build_tiny_model

    def make(seed: int = 0):
        return build_tiny_model(tokenizer, seed=seed)

    return make


@pytest.fixture(scope="session")
def chat_data():
    """(train, eval) in TRL's conversational prompt-completion format: 96 and 16 rows."""
    from rf_callbacks.demo import demo_datasets

    train, val = demo_datasets()
    return train.select(range(96)), val.select(range(16))


@pytest.fixture
def sft_args(tmp_path):
    """SFTConfig factory with the CPU settings every test wants (no bf16, no checkpointing, no reporters)."""
    from trl import SFTConfig

    def make(**overrides):
        values = dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            max_steps=12,
            logging_steps=1,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            seed=7,
        )
        values.update(overrides)
        return SFTConfig(**values)

    return make
