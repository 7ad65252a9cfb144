"""Parking: what a run keeps while another run trains, and how it gets it back exactly.

Three kinds of state must travel with a run for rotation to be exact (leaving any one out changes the result, see
`tests/test_exactness.py`): the optimizer state, the LR scheduler and the random number generators. The scheduler
and optimizer stay the run's own live objects, so a swap is a pointer switch. On a GPU the optimizer's tensors can
additionally be moved to pinned host memory while the run waits (`offload_optimizer`), freeing device memory for
the active run; on CPU-only torch `pin_memory` raises, and nothing moves.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Snapshot of every generator a training step may draw from (python, numpy, torch CPU, all CUDA devices)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seeded_rng(seed: int) -> dict[str, Any]:
    """The generators' state right after `transformers.set_seed(seed)`, without disturbing the current one."""
    from transformers import set_seed

    saved = capture_rng()
    set_seed(seed)
    state = capture_rng()
    restore_rng(saved)
    return state


def can_pin_memory() -> bool:
    return torch.cuda.is_available()


def offload_optimizer(optimizer: torch.optim.Optimizer, buffers: dict[tuple[int, str], torch.Tensor]) -> None:
    """Copy the optimizer's GPU tensors into the run's (reused) pinned host buffers and point the state at them."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                buffer = buffers.get((id(param), key))
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = buffers[(id(param), key)] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                buffer.copy_(value, non_blocking=True)
                state[key] = buffer
    torch.cuda.synchronize()


def reload_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Bring an offloaded optimizer's tensors back to `device` (the pinned buffers stay for the next park)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_pinned():
                state[key] = value.to(device, non_blocking=True)


def load_moments(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load another optimizer's `state_dict()` (a clone's `copy_optimizer`: the parent's moments) into `optimizer`,
    keeping `optimizer`'s own hyper-parameters (learning rate, betas, weight decay: the child's schedule)."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


def should_offload(setting: bool | str, optimizer_bytes: int) -> bool:
    """`True`: park in pinned host memory; `False`: keep on the device; `"auto"`: keep it on the device while that
    leaves at least 10% of the GPU free (`torch.cuda.mem_get_info`). Always `False` on CPU-only torch."""
    if not can_pin_memory():
        return False
    if setting == "auto":
        free, total = torch.cuda.mem_get_info()
        return free - optimizer_bytes < 0.1 * total
    return bool(setting)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
