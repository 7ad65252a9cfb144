"""Private TRL / transformers / PEFT / accelerate names the code relies on still exist, and all are listed.

rf-callbacks works inside TRL's trainers, so an upgrade can remove or rename a private name it reads, overrides or
mirrors. The table in docs/maintainers.md ("Private names the code relies on") is the one list of them: this test
checks every row against the installed packages (failing with the name, where it should live and why it matters),
and checks that every private upstream name used anywhere in `rf_callbacks/` is a row of the table, so the list
cannot fall behind the code.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAINTAINERS = ROOT / "docs" / "maintainers.md"
PACKAGE = ROOT / "rf_callbacks"
KINDS = {"override", "method", "attribute", "class attribute", "mirrored", "module attribute"}

# Upstream classes and modules whose private names the code could use; a private name used in rf_callbacks/ that
# one of these has must be in the table (or below, as rf-callbacks' own name that merely shares the spelling).
UPSTREAM = (
    "transformers.Trainer",
    "transformers.TrainerState",
    "transformers.TrainerControl",
    "transformers.TrainingArguments",
    "transformers.TrainerCallback",
    "transformers.PreTrainedModel",
    "transformers.PretrainedConfig",
    "transformers.PreTrainedTokenizerFast",
    "trl.SFTTrainer",
    "trl.DPOTrainer",
    "trl.GRPOTrainer",
    "trl.SFTConfig",
    "trl.DPOConfig",
    "trl.GRPOConfig",
    "trl.trainer.utils",
    "peft.PeftModel",
    "peft.tuners.tuners_utils.BaseTunerLayer",
    "peft.tuners.lora.Linear",
    "accelerate.Accelerator",
    "accelerate.state.AcceleratorState",
    "accelerate.state.PartialState",
    "accelerate.state.GradientState",
    "torch.optim.Optimizer",
    "torch.nn.Module",
    "argparse",
)

# rf-callbacks' own private names that happen to be spelled like a name one of UPSTREAM has: name -> why it is not
# the upstream one. Empty today; each entry must really share a spelling (checked), so the list cannot go stale.
OWN_NAMES: dict[str, str] = {}


def _resolve(dotted: str):
    """`a.b.C` -> the module `a.b`'s attribute `C` (or the module itself)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


@functools.cache
def _source_names(owner: object) -> frozenset[str]:
    """`self.<name>` attributes the source of `owner` (a class: every upstream class in its MRO) sets or reads."""
    classes = [c for c in owner.__mro__ if c is not object] if inspect.isclass(owner) else [owner]
    names = set()
    for cls in classes:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        names |= set(re.findall(r"\bself\.(_[A-Za-z]\w*)", source))
    return frozenset(names)


def _has(owner: object, name: str) -> bool:
    return hasattr(owner, name) or name in _source_names(owner)


def _table() -> list[tuple[str, list[str], str, str]]:
    """Rows `(name, owners, kind, why)` of the private-name table in docs/maintainers.md."""
    text = MAINTAINERS.read_text()
    section = text.split("## Private names the code relies on", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`_"):
            continue
        name = cells[0].strip("`")
        owners = re.findall(r"`([\w.]+)`", cells[1])
        rows.append((name, owners, cells[2], cells[3]))
    return rows


TABLE = _table()


def _used_private_names() -> dict[str, set[str]]:
    """Private names in `rf_callbacks/`: attributes (`x._name`), attribute names held as strings (`"_name"`, e.g. the
    per-run attribute lists), names imported (`from m import _name`), and names in docstrings/comments that say
    `Class._name` (what the code mirrors). `_rf_*` names are rf-callbacks' own and skipped."""
    used: dict[str, set[str]] = {}

    def add(name: str, path: Path) -> None:
        if name.startswith("_") and not name.startswith(("__", "_rf_")):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))

    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute):
                add(node.attr, path)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"_[A-Za-z]\w*", node.value):
                    add(node.value, path)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    add(alias.name, path)
        for name in re.findall(r"\b[A-Z]\w*\.(_[a-z]\w*)`", source):  # `Trainer._run_epoch` in prose
            add(name, path)
    return used


def test_table_is_well_formed():
    assert len(TABLE) >= 20, "the private-name table in docs/maintainers.md was not found or lost rows"
    names = [row[0] for row in TABLE]
    assert len(names) == len(set(names)), f"names listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    for name, owners, kind, why in TABLE:
        assert owners, f"{name}: no owner (`package.Class`) given"
        assert kind in KINDS, f"{name}: kind {kind!r} is not one of {sorted(KINDS)}"
        assert len(why) > 10, f"{name}: say why the code needs it"


@pytest.mark.parametrize("name,owners,kind,why", TABLE, ids=[row[0] for row in TABLE])
def test_private_name_still_exists(name, owners, kind, why):
    for dotted in owners:
        owner = _resolve(dotted)
        if kind == "attribute":
            found = _has(owner, name)
        else:
            found = hasattr(owner, name)
        assert found, (
            f"{dotted}.{name} is gone from the installed package ({kind}; rf-callbacks needs it: {why}). "
            f"Update the code that relies on it and the table in docs/maintainers.md."
        )


def test_every_private_upstream_name_used_is_listed():
    listed = {row[0] for row in TABLE}
    owners = [_resolve(dotted) for dotted in UPSTREAM]
    used = _used_private_names()
    upstream = {name: files for name, files in used.items() if any(_has(owner, name) for owner in owners)}
    unlisted = {name: sorted(files) for name, files in upstream.items() if name not in listed | set(OWN_NAMES)}
    assert not unlisted, (
        "private upstream names used in rf_callbacks/ but not in the table of docs/maintainers.md (add a row saying "
        f"where it lives and why, or, if it is rf-callbacks' own name, add it to OWN_NAMES): {unlisted}"
    )


def test_every_listed_name_is_still_used():
    used = _used_private_names()
    stale = sorted(name for name, *_ in TABLE if name not in used)
    assert not stale, f"listed in docs/maintainers.md but no longer used in rf_callbacks/ (remove the rows): {stale}"
    owners = [_resolve(dotted) for dotted in UPSTREAM]
    needless = sorted(name for name in OWN_NAMES if name not in used or not any(_has(o, name) for o in owners))
    assert not needless, f"OWN_NAMES that no longer clash with an upstream name in use (remove them): {needless}"
