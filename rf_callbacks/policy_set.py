"""`PolicySet`: the automatic policies given to one experiment, which of them are still enabled, and their memory.

At each boundary the trainer calls `ask(view, submit, failed)`: every enabled policy sees the view and its ops are
submitted (validated and queued like the user's); a policy that raises, or returns anything but a list of `Op`, is
disabled for the rest of the experiment and reported through `failed`.

What a checkpoint keeps and what rank 0 sends the other ranks is `state_dict()`: the positions of the enabled
policies in the list as given, and each given policy's memory (successive halving's rung), so a resumed experiment or
another rank pairs every state with the policy it came from, also after one was disabled.

Usage:

```python
policies = PolicySet.check([SuccessiveHalving(eta=2)], trainer)
if policies.evaluates_at(slices=2):
    ...
policies.ask(BoundaryView.of("run-1", trainer.coordinator, num_chunks=4), trainer.submit_op, on_policy_error)
state = policies.state_dict()  # JSON-serialisable
PolicySet.check([SuccessiveHalving(eta=2)], trainer).load_state_dict(state)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

from .ops import Op, OpError
from .policies import BoundaryView, Policy

logger = logging.getLogger(__name__)


def _memory(policy: Any) -> dict[str, Any] | None:
    if callable(getattr(policy, "state_dict", None)):
        return policy.state_dict()
    if dataclasses.is_dataclass(policy):  # the built-in policies keep their memory in non-init fields
        return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if not f.init}
    return None


def _load_memory(policy: Any, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    if callable(getattr(policy, "load_state_dict", None)):
        policy.load_state_dict(state)
    else:
        for key, value in state.items():
            setattr(policy, key, value)


class PolicySet:
    """The policies of one experiment, in the order given; iterating yields the enabled ones.

    Args:
        policies (`list[Policy]`): As passed to the trainer's `policies=`.
    """

    def __init__(self, policies: list[Policy]):
        self.given = list(policies)
        self.enabled = list(range(len(self.given)))  # positions in `given`

    @classmethod
    def check(cls, policies: list[Policy] | None, trainer: Any) -> PolicySet:
        """The set for `trainer`, refusing (`ValueError`, naming `policies[i]`) what it cannot honour."""
        policies = list(policies or [])
        for i, policy in enumerate(policies):
            if not isinstance(policy, Policy):
                raise ValueError(f"policies[{i}] must have an on_boundary(view) method, got {type(policy).__name__}")
            metric = getattr(policy, "metric", None)  # the built-in policies say what they compare
            if isinstance(metric, str) and metric.startswith("eval_") and trainer.eval_dataset is None:
                raise ValueError(
                    f"policies[{i}] ({type(policy).__name__}) compares {metric!r}, which needs an eval_dataset; pass "
                    f"one, or use metric='loss'"
                )
            check = getattr(policy, "check_trainer", None)  # arguments valid only for some trainers (Explore.perturb)
            if check is not None:
                try:
                    check(trainer)
                except ValueError as error:
                    raise ValueError(f"policies[{i}] ({type(policy).__name__}): {error}") from error
        return cls(policies)

    def __iter__(self) -> Iterator[Policy]:
        return iter([self.given[i] for i in self.enabled])  # a copy: `disable` may run while the caller iterates

    def __len__(self) -> int:
        return len(self.enabled)

    def disable(self, policy: Policy) -> None:
        self.enabled = [i for i in self.enabled if self.given[i] is not policy]

    def ask(self, view: BoundaryView, submit: Callable[[Op], Any], failed: Callable[[str, Exception], None]) -> None:
        """Show `view` to every enabled policy and `submit` the ops it returns, each with the policy's class name as
        its `source` (unless the policy set one). A refused op is left to the ledger (`submit` records the reason);
        a policy that raises or returns anything but a list of `Op` is disabled and passed to `failed(name, error)`:
        a broken policy must not end the experiment."""
        for policy in self:
            name = type(policy).__name__
            try:
                ops = policy.on_boundary(view) or []
                if not all(isinstance(op, Op) for op in ops):
                    raise TypeError(f"on_boundary must return a list of Op, got {ops!r}")
            except Exception as error:
                logger.exception("policy %s failed and is disabled", name)
                self.disable(policy)
                failed(name, error)
                continue
            for op in ops:
                op.source = op.source if op.source != "python" else name
                with contextlib.suppress(OpError):
                    submit(op)

    def names(self) -> set[str]:
        """The class names of every given policy: the `by` of the ops they issue."""
        return {type(policy).__name__ for policy in self.given}

    def evaluates_at(self, slices: int) -> bool:
        """Whether an enabled policy needs every run's eval metrics at the boundary after `slices` slices."""
        return any(getattr(policy, "evaluates_at", lambda _: True)(slices) for policy in self)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": list(self.enabled), "states": [_memory(policy) for policy in self.given]}

    def load_state_dict(self, state: dict[str, Any] | list) -> None:
        """Restore `state_dict()`'s result for the same policies, given in the same order."""
        if isinstance(state, list):  # checkpoints before 2026-12-07: the enabled policies' states, none disabled
            state = {"enabled": list(range(len(state))), "states": state}
        if len(state["states"]) != len(self.given):  # the script changed its policies: they start afresh
            logger.warning(
                "the checkpoint was written with %d policies, this trainer has %d: they start with no memory",
                len(state["states"]), len(self.given),
            )  # fmt: skip
            return
        self.enabled = list(state["enabled"])
        for policy, memory in zip(self.given, state["states"]):
            _load_memory(policy, memory)
