"""Search spaces: `List` and `Range` values, and the two ways to turn a config holding them into concrete configs.

Any value of a config may be a `List([...])` (a choice among values) or a `Range(start, end)` (an interval), at any
depth: a field of `RFLoraConfig`/`RFSFTConfig`, an item of a `dict` or `list` field (`lr_scheduler_kwargs`,
`reward_funcs`), or a whole `peft_config`/`training_args` chosen among several. `grid_expand` returns the cross
product of every `List` (a `Range` cannot be enumerated); `sample` draws one value of each `List` (uniformly) and each
`Range` (uniformly, or log-uniformly with `log=True`) from a caller-owned `random.Random`.

Config objects take part through two methods, so this module knows no config class: `_rf_params()` (the constructor
keyword arguments, possibly holding `List`/`Range`) and `_rf_build(params)` (a new object from concrete arguments;
building it is what runs the parent class's validation).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any


class List:
    """A choice among values: grid search tries each, random search draws one uniformly.

    Args:
        values (`list` or `tuple`): The candidates, at least one. A candidate may itself hold `List`/`Range` values.
    """

    def __init__(self, values: Sequence[Any]):
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            raise TypeError(f"List expects a list of values, got {type(values).__name__}")
        if len(values) == 0:
            raise ValueError("List needs at least one value")
        self.values = list(values)

    def sample(self, rng: random.Random | None = None) -> Any:
        return (rng or random).choice(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, List) and self.values == other.values

    __hash__ = None  # mutable, like the list it holds

    def __repr__(self) -> str:
        return f"List({self.values!r})"


class Range:
    """An interval `[start, end]` that random search samples; grid search refuses it (it cannot be enumerated).

    Args:
        start, end (`int` or `float`): Bounds, both included, `start <= end`.
        dtype (`"int"` or `"float"`, *optional*): Type of the drawn values; by default `"int"` when both bounds are
            ints, else `"float"`.
        log (`bool`, *optional*, defaults to `False`): Draw uniformly in log space (both bounds must be > 0), as one
            does for learning rates.
        step (`int` or `float`, *optional*): Draw only `start + k * step` (not with `log=True`).
    """

    def __init__(self, start, end, dtype: str | None = None, log: bool = False, step: float | None = None):
        for name, bound in (("start", start), ("end", end)):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise ValueError(f"Range {name}={bound!r} must be a finite int or float")
        if start > end:
            raise ValueError(f"Range start={start!r} is greater than end={end!r}")
        if dtype is None:
            dtype = "int" if isinstance(start, int) and isinstance(end, int) else "float"
        if dtype not in ("int", "float"):
            raise ValueError(f"Range dtype={dtype!r} is invalid; use 'int' or 'float'")
        if log and start <= 0:
            raise ValueError(f"Range(log=True) needs start > 0, got start={start!r}")
        if step is not None and (log or not step > 0):
            raise ValueError(f"Range step={step!r} must be > 0 and cannot be combined with log=True")
        self.start, self.end, self.dtype, self.log, self.step = start, end, dtype, bool(log), step

    def sample(self, rng: random.Random | None = None) -> int | float:
        rng = rng or random
        low, high = self.start, self.end
        if self.step is not None:
            value = low + rng.randint(0, int((high - low) // self.step)) * self.step
        elif self.log:
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        elif self.dtype == "int":
            return rng.randint(math.ceil(low), math.floor(high))
        else:
            value = rng.uniform(low, high)
        if self.dtype == "int":
            return int(min(max(round(value), math.ceil(low)), math.floor(high)))
        return float(min(max(value, low), high))  # exp(log(x)) may land a hair outside the bounds

    def _key(self) -> tuple:
        return (self.start, self.end, self.dtype, self.log, self.step)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Range) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("log", self.log), ("step", self.step)) if v not in (False, None))
        return f"Range({self.start!r}, {self.end!r}, dtype={self.dtype!r}{extra})"


def _is_config(value: Any) -> bool:
    return hasattr(value, "_rf_params") and hasattr(value, "_rf_build") and not isinstance(value, type)


def has_space(value: Any) -> bool:
    """Whether `value` holds a `List` or `Range` anywhere (in configs, dicts, lists and tuples)."""
    if isinstance(value, (List, Range)):
        return True
    if _is_config(value):
        return has_space(value._rf_params())
    if isinstance(value, dict):
        return any(has_space(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_space(item) for item in value)
    return False


def grid_expand(value: Any, where: str = "config") -> list[Any]:
    """Every concrete value `value` stands for: the cross product of its `List`s, in order (first field slowest)."""
    if not has_space(value):
        return [value]
    if isinstance(value, Range):
        raise ValueError(
            f"{where} is {value!r}: grid search enumerates List values only; a Range has no finite set of values. "
            "Use RFRandomSearch(configs, trainer_type, num_runs=..., seed=...) to sample it, or a List([...])."
        )
    if isinstance(value, List):
        return [leaf for i, choice in enumerate(value.values) for leaf in grid_expand(choice, f"{where}[{i}]")]
    if _is_config(value):
        return [value._rf_build(params) for params in grid_expand(value._rf_params(), where)]
    if isinstance(value, dict):
        keys = list(value)
        options = [grid_expand(value[key], f"{where}.{key}") for key in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*options)]
    options = [grid_expand(item, f"{where}[{i}]") for i, item in enumerate(value)]
    return [type(value)(combo) for combo in itertools.product(*options)]


def sample(value: Any, rng: random.Random) -> Any:
    """One concrete draw of `value`: each `List` picks one candidate, each `Range` one number."""
    if not has_space(value):
        return value
    if isinstance(value, (List, Range)):
        return sample(value.sample(rng), rng)
    if _is_config(value):
        return value._rf_build(sample(value._rf_params(), rng))
    if isinstance(value, dict):
        return {key: sample(item, rng) for key, item in value.items()}
    return type(value)(sample(item, rng) for item in value)
