"""Run a TRL trainer and its RF trainer on the same script and compare what a user can see: the error (type and
message) or the trained weights, the logged history and the files written."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import set_seed

# Logged values that measure time, not training.
TIMING = re.compile(r"runtime|per_second|time|total_flos")


def build(trainer_cls: type, make_kwargs: Callable[[Path], dict[str, Any]], out: Path, seed: int = 7):
    """Build `trainer_cls(**make_kwargs(out))` and train it: the trainer, or the exception either step raised."""
    set_seed(seed)
    try:
        trainer = trainer_cls(**make_kwargs(out))
        trainer.train()
    except Exception as error:
        return error
    return trainer


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def history(trainer) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if not TIMING.search(k)} for entry in trainer.state.log_history]


def files(out: Path) -> list[str]:
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


def assert_same_files(left: Path, right: Path) -> None:
    assert files(left) == files(right)
    for name in files(left):
        a, b = left / name, right / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys(), name
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name
        elif name.endswith("trainer_state.json"):
            # Paths inside (best_model_checkpoint) name each side's own output folder.
            sa = json.loads(a.read_text().replace(str(left), "OUT"))
            sb = json.loads(b.read_text().replace(str(right), "OUT"))
            for state in (sa, sb):
                state["log_history"] = [
                    {k: v for k, v in e.items() if not TIMING.search(k)} for e in state["log_history"]
                ]
                state.pop("total_flos", None)
            assert sa == sb, name
        elif name.endswith((".json", ".jinja", ".txt", ".model")) and not name.endswith("training_args.json"):
            assert a.read_bytes() == b.read_bytes(), name


def compare(
    parent_cls: type, rf_cls: type, make_kwargs: Callable[[Path], dict[str, Any]], tmp_path: Path, fails: bool = False
):
    """Run both side by side; assert the same error (`fails=True`: the parent must raise), or the same weights,
    history and files. Returns both."""
    parent = build(parent_cls, make_kwargs, tmp_path / "parent")
    assert isinstance(parent, Exception) == fails, f"{parent_cls.__name__} gave {parent!r}"
    ours = build(rf_cls, make_kwargs, tmp_path / "ours")
    if fails or isinstance(ours, Exception):
        assert type(ours) is type(parent), (parent, ours)
        assert str(ours) == str(parent)
        return parent, ours
    a, b = weights(parent.model), weights(ours.model)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]
    assert history(ours) == history(parent)
    assert_same_files(tmp_path / "parent", tmp_path / "ours")
    return parent, ours


def assert_engine_equals_parent(
    parent_cls: type, rf_cls: type, make_kwargs: Callable[[Path], dict[str, Any]], tmp_path: Path, atol: float = 1e-6
):
    """The same script through the engine (one run, `configs=[{}]`): the files differ by design (runs/, a ledger),
    the weights and the losses must not. Returns both trainers."""
    parent = build(parent_cls, make_kwargs, tmp_path / "parent")
    assert not isinstance(parent, Exception), f"{parent_cls.__name__} gave {parent!r}"
    ours = build(lambda **kwargs: rf_cls(**kwargs, configs=[{}]), make_kwargs, tmp_path / "engine")
    assert not isinstance(ours, Exception), f"{rf_cls.__name__} with configs=[{{}}] gave {ours!r}"
    a = weights(parent.model)
    b = {k.replace(".run-1.", ".default."): v for k, v in weights(ours.model).items()}  # the run's adapter name
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= atol
    losses = [(e["step"], e["loss"]) for e in parent.state.log_history if "loss" in e]
    assert [(e["step"], e["loss"]) for e in ours.runs["run-1"].state.log_history if "loss" in e] == losses
    return parent, ours
