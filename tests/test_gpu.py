"""GPU-only checks (skipped without CUDA): parking optimizer state in pinned host memory changes nothing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_offloaded_optimizer_state_is_pinned_and_exact(tokenizer, chat_data, sft_args, tmp_path):
    torch.use_deterministic_algorithms(True, warn_only=True)
    weights = {}
    for offload in (True, False):
        set_seed(7)
        trainer = RFSFTTrainer(
            model=build_tiny_model(tokenizer),
            args=sft_args(output_dir=str(tmp_path / str(offload)), use_cpu=False, max_steps=12),
            train_dataset=chat_data[0],
            processing_class=tokenizer,
            configs=[
                {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])},
                {"name": "b", "peft_config": LoraConfig(r=8, target_modules="all-linear"), "learning_rate": 3e-3},
            ],
            num_chunks=3,
            offload_optimizer=offload,
        )
        trainer.train()
        parked = trainer.runs["a"] if trainer.active_run.name == "b" else trainer.runs["b"]
        if offload:
            states = [v for s in parked.attributes["optimizer"].state.values() for v in s.values() if v.dim() > 0]
            assert states and all(v.is_pinned() for v in states)
        weights[offload] = get_peft_model_state_dict(trainer.model, adapter_name="a")
    assert all(torch.equal(weights[True][key], weights[False][key]) for key in weights[True])


def test_fused_on_cuda_matches_rotation_with_offloaded_optimizers(tokenizer, chat_data, sft_args, tmp_path):
    """Fused groups reload members' pinned optimizer state; max_fused="auto" measures the memory per row."""
    weights = {}
    for fused in (False, True):
        set_seed(7)
        trainer = RFSFTTrainer(
            model=build_tiny_model(tokenizer),
            args=sft_args(output_dir=str(tmp_path / f"fused-{fused}"), use_cpu=False, max_steps=12),
            train_dataset=chat_data[0],
            processing_class=tokenizer,
            configs=[
                {"name": "a", "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])},
                {"name": "b", "peft_config": LoraConfig(r=8, target_modules="all-linear"), "learning_rate": 3e-3},
                {"name": "c", "peft_config": LoraConfig(r=2, target_modules=["up_proj"]), "learning_rate": 5e-4},
            ],
            num_chunks=3,
            fused=fused,
        )
        trainer.train()
        assert [row["status"] for row in trainer.results()] == ["completed"] * 3
        if fused:
            assert trainer._rf_fused.row_bytes > 0
        weights[fused] = {name: get_peft_model_state_dict(trainer.model, adapter_name=name) for name in "abc"}
    for name in "abc":
        diff = max((weights[True][name][k] - weights[False][name][k]).abs().max().item() for k in weights[True][name])
        assert diff < 1e-3, (name, diff)  # TF32/cuBLAS reduction order differs with the batch shape
