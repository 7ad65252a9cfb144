"""IC ops: the vocabulary of interactive control (stop, resume, delete, clone) and its validation.

One implementation serves every way in: `trainer.stop("b")` from Python (any thread), a JSON line on the control
socket, the `rf-callbacks` CLI, the dashboard, and automatic policies. An op is checked when it is issued (unknown
run, op not valid in the run's status, unknown or invalid override) and answered at once; an accepted op is applied by
the training loop at the active run's next optimizer step (stop, delete) or at the next boundary (resume, clone), and
recorded in the ledger with who issued it, what it was and when. This module imports nothing heavy, so the CLI and the
socket server can use it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

OP_KINDS = ("stop", "resume", "delete", "clone")  # what the socket, the CLI and the page accept; `fail` is Python-only
READ_KINDS = ("ls", "status", "metrics")
MAX_REQUEST_BYTES = 64 * 1024

# Which statuses each op accepts.
VALID_FROM = {
    "stop": ("pending", "running"),
    "resume": ("stopped",),
    "delete": ("pending", "running", "stopped", "completed", "failed"),
    "clone": ("pending", "running", "stopped", "completed", "failed"),
    "fail": ("pending", "running", "stopped"),
}

# What `Op.record()` keeps: everything that defines an op (not when it was issued, nor the clone's built spec).
RECORD_FIELDS = ("kind", "run", "overrides", "warm_start", "copy_optimizer", "name", "source", "reason")


@dataclass
class Op:
    """One interactive control operation.

    Args:
        kind (`str`): One of `stop`, `resume`, `delete`, `clone`, or `fail` (from Python only: what a policy issues
            for a run it judges broken; the run ends with status `failed` and the reason as its error).
        run (`str`): The run it targets (for `clone`, the parent).
        overrides (`dict`, *optional*): `clone` only: per-run fields to change, e.g. `{"learning_rate": 5e-4}`;
            PEFT fields as `{"peft_config": {"r": 16}}` or `{"peft_config.r": 16}`.
        warm_start (`bool`): `clone` only: start from the parent's adapter weights at its last boundary.
        copy_optimizer (`bool`): `clone` with `warm_start` only: also copy the parent's optimizer state.
        name (`str`, *optional*): `clone` only: the child's name (default `<parent>-clone-<k>`).
        source (`str`): Who issued it: `python`, `socket`, `cli`, `dashboard` or a policy's name.
        reason (`str`, *optional*): Why, in words (a policy's decision: "eval_loss 5.91 > cut 5.87"); kept in the
            ledger, the run's `results()` row, `run.json` and the reporters.
    """

    kind: str
    run: str
    overrides: dict[str, Any] = field(default_factory=dict)
    warm_start: bool = False
    copy_optimizer: bool = False
    name: str | None = None
    source: str = "python"
    reason: str | None = None
    issued: float = field(default_factory=time.time)
    spec: Any = field(default=None, repr=False)  # clone: the child's validated `RunSpec`

    def describe(self) -> dict[str, Any]:
        """The op as a ledger record would show it."""
        record: dict[str, Any] = {"op": self.kind, "target": self.run, "by": self.source}
        if self.kind == "clone":
            record.update(overrides=self.overrides, warm_start=self.warm_start, name=self.name)
            if self.copy_optimizer:
                record["copy_optimizer"] = True
        if self.reason is not None:
            record["reason"] = self.reason
        return record

    def record(self) -> dict[str, Any]:
        """The op as JSON values: what a checkpoint keeps of a pending op and what rank 0 sends the other processes."""
        return {key: getattr(self, key) for key in RECORD_FIELDS}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Op:
        return cls(**{key: record[key] for key in RECORD_FIELDS})

    @classmethod
    def from_described(cls, record: dict[str, Any]) -> Op:
        """The op a ledger record (`describe()`, as written with `event="op"`) shows."""
        return cls(
            kind=record["op"],
            run=record["target"],
            overrides=record.get("overrides", {}),
            warm_start=record.get("warm_start", False),
            copy_optimizer=record.get("copy_optimizer", False),
            name=record.get("name"),
            source=record["by"],
            reason=record.get("reason"),
        )


class OpError(ValueError):
    """An op that cannot be accepted; the message says why (it is what the socket and the CLI answer)."""


def _field(request: dict, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False):
    if key not in request:
        if required:
            raise OpError(f"missing field {key!r}")
        return default
    value = request[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise OpError(f"field {key!r} must be {names}, got {type(value).__name__}")
    return value


def parse_request(request: Any, source: str = "socket") -> Op | tuple[str, dict[str, Any]]:
    """Turn one decoded JSON request into an `Op`, or `(read_kind, arguments)` for `ls`/`status`/`metrics`.

    Raises:
        `OpError`: the request is not an object, names an unknown op, or has a field of the wrong type.
    """
    if not isinstance(request, dict):
        raise OpError(f"a request must be a JSON object, got {type(request).__name__}")
    kind = _field(request, "op", str, required=True)
    allowed = {
        "stop": {"op", "run"},
        "resume": {"op", "run"},
        "delete": {"op", "run"},
        "clone": {"op", "run", "overrides", "warm_start", "copy_optimizer", "name"},
        "ls": {"op"},
        "status": {"op"},
        "metrics": {"op", "run", "last"},
    }
    if kind not in allowed:
        raise OpError(f"unknown op {kind!r}; ops are {', '.join(OP_KINDS + READ_KINDS)}")
    unknown = sorted(set(request) - allowed[kind] - {"by"})
    if unknown:
        raise OpError(f"unknown field(s) {unknown} for op {kind!r}")
    by = _field(request, "by", str)
    if by is not None:
        if not by.isidentifier() or len(by) > 32:
            raise OpError("field 'by' must be a short identifier (e.g. 'cli')")
        source = by
    if kind in READ_KINDS:
        arguments = {}
        if kind == "metrics":
            arguments["run"] = _field(request, "run", str)
            arguments["last"] = _field(request, "last", int, default=50)
            if arguments["last"] < 1:
                raise OpError(f"field 'last' must be >= 1, got {arguments['last']}")
        return kind, arguments
    op = Op(kind=kind, run=_field(request, "run", str, required=True), source=source)
    if kind == "clone":
        op.overrides = _field(request, "overrides", dict, default={})
        op.warm_start = _field(request, "warm_start", bool, default=False)
        op.copy_optimizer = _field(request, "copy_optimizer", bool, default=False)
        op.name = _field(request, "name", str)
    return op


def merge_peft_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split clone overrides into (training-argument overrides, PEFT field overrides).

    Accepts `{"peft_config": {"r": 16}}` and the CLI's flat `{"peft_config.r": 16}`.
    """
    training, peft = {}, {}
    for key, value in overrides.items():
        if key == "peft_config" and isinstance(value, dict):
            peft.update(value)
        elif key.startswith("peft_config."):
            peft[key.split(".", 1)[1]] = value
        else:
            training[key] = value
    return training, peft


class OpQueue:
    """The accepted ops waiting for the training loop's next safe point, shared by every thread that submits them.

    Hold `lock` around any read or change (it is re-entrant: an op applied under it may submit more, e.g. a policy's).
    `training`: the loop is running, so ops wait in `pending`; otherwise they are applied at once. `interrupt`: an op
    targets the run being trained, which parks after its current optimizer step.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pending: list[Op] = []
        self.training = False
        self.interrupt = False

    def take(self) -> list[Op]:
        """The pending ops, in the order accepted, handed over once (the interrupt is answered with them)."""
        pending, self.pending, self.interrupt = self.pending, [], False
        return pending
