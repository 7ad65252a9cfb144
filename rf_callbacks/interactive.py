"""`InteractiveMixin`: stop, resume, delete and clone runs while `train()` runs (or between `train()` calls).

Ops are validated when issued, from any thread, and answered at once (`OpError` names the problem). The training
loop applies accepted ops at safe points: a stop or delete of the run that is training takes effect after its current
optimizer step; everything else at the next boundary. When no training loop is running, an op is applied at once.

- `stop`: the run keeps its full state (adapter, optimizer, scheduler, RNG, position inside the chunk) and leaves the
  rotation; `resume` puts it back and it continues bit-for-bit as if it had never stopped.
- `delete`: the run leaves for good; its adapter and optimizer are freed; what it saved and logged stays.
- `clone`: a new run from the parent's config with overrides. It starts on the data after the parent's last completed
  chunk, with its own full step budget, its own LR schedule (warmup included) and a fresh optimizer. With
  `warm_start=True` its adapter starts from the parent's weights as of the parent's last completed boundary (same rank
  and target modules required); `copy_optimizer=True` also copies the parent's optimizer moments as of its latest step
  (the child's learning rate and schedule stay its own).

Automatic policies (`policies.py`) are asked what to do each time a run reaches a boundary (`_run_policies`, through
`PolicySet.ask`) and answer with the same ops, validated, applied (`applying.OpApplier`) and recorded the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import Any

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from .applying import OpApplier
from .configs import RunSpec, parse_configs
from .ops import VALID_FROM, Op, OpError, OpQueue, merge_peft_overrides, parse_request
from .policies import BoundaryView
from .run import Run

logger = logging.getLogger(__name__)


class InteractiveMixin:
    """The IC-op half of `MultiConfigMixin` (which calls `_init_control` and the safe-point hooks), and the glue that
    lets policies issue the same ops at boundaries."""

    def _init_control(self) -> None:
        self._rf_ops = OpQueue()
        self._rf_applier = OpApplier(self)

    # ------------------------------------------------------------------------------------------------ public
    def stop(self, run: str, source: str = "python") -> str:
        """Park run `run` at its next optimizer step; it keeps its state and can be resumed."""
        return self.submit_op(Op("stop", run, source=source))

    def resume(self, run: str, source: str = "python") -> str:
        """Put a stopped run back into the rotation, where it left off."""
        return self.submit_op(Op("resume", run, source=source))

    def delete(self, run: str, source: str = "python") -> str:
        """Remove a run for good and free its adapter and optimizer (its saved files and metrics stay)."""
        return self.submit_op(Op("delete", run, source=source))

    def clone(
        self,
        run: str,
        overrides: dict[str, Any] | None = None,
        warm_start: bool = False,
        name: str | None = None,
        copy_optimizer: bool = False,
        source: str = "python",
    ) -> str:
        """Start a new run from `run`'s config with `overrides` applied; returns the new run's name."""
        op = Op("clone", run, dict(overrides or {}), warm_start, copy_optimizer, name, source=source)
        return self.submit_op(op)

    def submit_op(self, op: Op) -> str:
        """Validate `op` now and apply it at the next safe point (at once if not training).

        Returns:
            `str`: the run the op targets (for `clone`, the child's name).

        Raises:
            `OpError`: unknown run, op not valid in the run's status, bad overrides.
        """
        with self._rf_ops.lock:
            try:
                self._validate_op(op)
            except OpError as error:
                self._rf_records.write(op.run, None, None, "op", **op.describe(), accepted=False, error=str(error))
                raise
            self._rf_records.write(op.run, None, None, "op", **op.describe(), accepted=True)
            if self._rf_ops.training:
                self._rf_ops.pending.append(op)
                active = self.active_run
                # (with several processes ops wait for the end of the round: see distributed.py)
                interrupts = op.kind in ("stop", "delete", "fail") and self._rf_dist is None
                if interrupts and active is not None and active.name == op.run:
                    self._rf_ops.interrupt = True
            else:
                self._rf_applier.apply(op)
        return op.name if op.kind == "clone" else op.run

    def handle_request(self, request: Any) -> dict[str, Any]:
        """Answer one decoded control request (the socket server's handler; also usable directly)."""
        parsed = parse_request(request)
        if isinstance(parsed, Op):
            return {"ok": True, "run": self.submit_op(parsed)}
        kind, arguments = parsed
        with self._rf_ops.lock:
            if kind == "ls":
                return {"ok": True, "runs": self.results()}
            if kind == "status":
                active = self.active_run
                return {
                    "ok": True,
                    "training": self._rf_ops.training,
                    "active": active.name if active is not None and self._rf_ops.training else None,
                    "chunk": active.current_chunk if active is not None else None,
                    "num_chunks": self._rf_setup.num_chunks,
                    "runs": {run.name: run.status for run in self.coordinator},
                    "pending_ops": [op.describe() for op in self._rf_ops.pending],
                }
            names = [arguments["run"]] if arguments["run"] else list(self.coordinator.runs)
            if arguments["run"] and arguments["run"] not in self.coordinator.runs:
                raise OpError(f"unknown run {arguments['run']!r}; runs are {sorted(self.coordinator.runs)}")
            history = {
                name: (self.coordinator[name].state.log_history if self.coordinator[name].state else [])
                for name in names
            }
            return {"ok": True, "metrics": {name: logs[-arguments["last"] :] for name, logs in history.items()}}

    # ---------------------------------------------------------------------------------------------- checks
    def _validate_op(self, op: Op) -> None:
        if op.kind not in VALID_FROM:
            raise OpError(f"unknown op {op.kind!r}")
        if op.run not in self.coordinator.runs:
            raise OpError(f"unknown run {op.run!r}; runs are {sorted(self.coordinator.runs)}")
        status = self._status_after_pending(op.run)
        if status not in VALID_FROM[op.kind]:
            raise OpError(f"cannot {op.kind} run {op.run!r}: it is {status}")
        if op.kind == "clone":
            if self._rf_checkpoints.schedule.every is not None:
                try:
                    json.dumps(op.overrides, allow_nan=False)
                except (TypeError, ValueError) as error:
                    raise OpError(f"clone overrides must be JSON values (checkpoints record them): {error}") from None
            op.spec = self._clone_spec(op)
            op.name = op.spec.name

    def _status_after_pending(self, name: str) -> str:
        """The run's status once the ops already accepted for it are applied."""
        status = self.coordinator[name].status
        for pending in self._rf_ops.pending:
            if pending.run == name and pending.kind in ("stop", "resume", "delete", "fail"):
                status = {"stop": "stopped", "resume": "running", "delete": "deleted", "fail": "failed"}[pending.kind]
        return status

    def _check_peft_override(self, peft_config, fields: dict[str, Any]) -> None:
        """What PEFT would refuse only while building the adapter (mid-training, failing the clone): LoRA's rank,
        alpha and dropout ranges, and target modules the model does not have."""
        if not isinstance(peft_config, LoraConfig):
            return
        number = (int, float)
        rules = {
            "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
            "lora_alpha": (lambda v: isinstance(v, number) and not isinstance(v, bool) and v > 0, "a number > 0"),
            "lora_dropout": (lambda v: isinstance(v, number) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
        }
        for key, (ok, rule) in rules.items():
            if key in fields and not ok(fields[key]):
                raise OpError(f"invalid peft_config override {key}={fields[key]!r}; it must be {rule}")
        targets = peft_config.target_modules
        if "target_modules" in fields and targets != "all-linear":
            names = [name for name, _ in self.model.get_base_model().named_modules()]
            if not any(check_target_module_exists(peft_config, name) for name in names):
                raise OpError(
                    f"invalid peft_config override target_modules={targets!r}: no module of the model matches"
                )

    def _clone_spec(self, op: Op) -> RunSpec:
        parent = self.coordinator[op.run].spec
        training, peft_fields = merge_peft_overrides(op.overrides)
        peft_config = copy.deepcopy(parent.peft_config)  # PEFT mutates the config it builds an adapter from
        if peft_fields:
            if peft_config is None:
                raise OpError(f"run {op.run!r} has no peft_config to override")
            unknown = sorted(k for k in peft_fields if k not in {f.name for f in dataclasses.fields(peft_config)})
            if unknown:
                raise OpError(f"unknown peft_config field(s) {unknown} for {type(peft_config).__name__}")
            try:
                peft_config = dataclasses.replace(peft_config, **peft_fields)
            except (TypeError, ValueError) as error:
                raise OpError(f"invalid peft_config override {peft_fields}: {error}") from error
            self._check_peft_override(peft_config, peft_fields)
        taken = set(self.coordinator.runs) | {p.name for p in self._rf_ops.pending if p.kind == "clone"}
        name = op.name
        if name is None:
            index = 1
            while f"{op.run}-clone-{index}" in taken:
                index += 1
            name = f"{op.run}-clone-{index}"
        elif name in taken:
            raise OpError(f"a run named {name!r} already exists")
        config = {**parent.overrides, **training, "name": name, "peft_config": peft_config}
        runs_dir = self._rf_setup.output_dir / "runs"
        try:
            (spec,) = parse_configs([config], self._rf_setup.args, None, self.per_run_fields, lambda n: runs_dir / n)
            self._check_run_spec(spec)
        except ValueError as error:
            raise OpError(str(error).replace("configs[0] ", "clone ")) from error
        if op.warm_start:
            before, after = _adapter_shape(parent.peft_config), _adapter_shape(spec.peft_config)
            for key in before:
                if before[key] != after[key]:
                    raise OpError(
                        f"warm_start needs the parent's adapter shape, but {key} changes from {before[key]!r} "
                        f"to {after[key]!r}; clone without warm_start to change it"
                    )
        elif op.copy_optimizer:
            raise OpError("copy_optimizer=True needs warm_start=True (a fresh adapter has no optimizer history)")
        spec.parent = op.run
        spec.summary["parent"] = op.run
        spec.summary["warm_start"] = op.warm_start
        return spec

    # ------------------------------------------------------------------------------------------ policies
    def _run_policies(self, run: Run) -> None:
        """Ask each policy what to do now that `run` reached a boundary; apply its ops before the next slice."""
        if self._rf_dist is not None:  # several processes: rank 0 asks them at the round's end
            self._rf_dist.boundaries.append(run.name)
            return
        self._ask_policies(run)
        self._rf_applier.apply_pending()

    def _ask_policies(self, run: Run) -> None:
        """Submit the ops the policies issue now that `run` reached a boundary (applied by the caller)."""

        def failed(policy: str, error: Exception) -> None:
            self._rf_records.write(run.name, run.global_step, run.current_chunk, "policy_error", policy=policy,
                                   error=f"{type(error).__name__}: {error}")  # fmt: skip

        view = BoundaryView.of(run.name, self.coordinator, self._rf_setup.num_chunks)
        self._rf_policies.ask(view, self.submit_op, failed)


def _adapter_shape(config) -> dict[str, Any]:
    """What a warm start must keep. PEFT replaces `target_modules="all-linear"` by the module names it resolved to
    when it builds the adapter, so names are compared as sets of the config as it is now."""
    if config is None:
        return {"peft_type": None, "r": None, "target_modules": None}
    targets = config.target_modules
    return {
        "peft_type": str(config.peft_type),
        "r": getattr(config, "r", None),
        "target_modules": targets if isinstance(targets, str) or targets is None else sorted(targets),
    }
