"""Shared fixtures: the embedded tiny Llama and tokenizer, small slices of the bundled data, CPU-friendly args."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trackio reads TRACKIO_DIR once, when first imported (TRL's GRPO module imports it): point it at a throwaway folder
# before any test module loads, so no test writes to the user's ~/.cache/huggingface/trackio.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="rf-callbacks-tests-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)


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
    """SFTConfig factory: CPU settings, output in this test's tmp_path; keyword arguments override."""
    from helpers import cpu_sft_config

    return lambda **overrides: cpu_sft_config(overrides.pop("output_dir", tmp_path / "out"), **overrides)
