"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations


def cpu_sft_config(output_dir, **overrides):
    """An `SFTConfig` with the CPU settings every test wants: no bf16, no checkpointing, no reporters, no saves."""
    from trl import SFTConfig

    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 12,
        "logging_steps": 1,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 7,
    }
    values.update(overrides)
    return SFTConfig(**values)
