"""`RFGridSearch` and `RFRandomSearch`: sized iterables of concrete `RFModelConfig` leaves, checked on creation.

Both take `configs` (one `RFModelConfig`, a list of them or a `List` of them) and a `trainer_type` ("SFT", "DPO" or
"GRPO"), expand them at once and check every leaf before anything is trained: it names a model, its
`training_args` is the config class of the trainer type, its `peft_config` is a PEFT config. `len(search)` is the
number of runs; iterating yields the leaves in run order (run ids are 1-based positions in it).

Grid search: every `List`, nested anywhere, is crossed with every other one; the configs are taken in the order
given and, within one, fields vary in declaration order with the first field slowest (`peft_config` before
`training_args`, `r` before `lora_alpha`). A `Range` is an error.

Random search: `num_runs` leaves, each from a config chosen uniformly, with each `List` drawn uniformly and each
`Range` uniformly (log-uniformly with `log=True`), from `random.Random(seed)` only, so the same seed gives the same
leaves. Leaves equal to an earlier one are redrawn (up to 10 tries per run), as RapidFire AI does.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

from peft import PeftConfig

from .configs import TRAINING_ARGS_CLASSES, RFModelConfig
from .space import List, grid_expand, has_space, sample

TRAINER_TYPES = ("SFT", "DPO", "GRPO")


def _normalize(configs: Any) -> list[RFModelConfig]:
    if isinstance(configs, List):
        configs = configs.values
    elif isinstance(configs, RFModelConfig):
        configs = [configs]
    if isinstance(configs, (str, bytes)) or not isinstance(configs, (list, tuple)) or not configs:
        raise ValueError(
            f"configs must be an RFModelConfig or a non-empty list/List of them, got {type(configs).__name__}"
        )
    for index, config in enumerate(configs):
        if not isinstance(config, RFModelConfig):
            raise ValueError(f"configs[{index}] must be an RFModelConfig, got {type(config).__name__}")
    return list(configs)


def check_leaf(leaf: RFModelConfig, trainer_type: str, where: str) -> None:
    """Refuse a concrete leaf the trainer could only fail on later; `where` names it in the message."""
    if not isinstance(leaf.model_name, str) or not leaf.model_name:
        raise ValueError(f"{where} has no model_name (got {leaf.model_name!r}); set the hub id or local path")
    expected = TRAINING_ARGS_CLASSES[trainer_type]
    if leaf.training_args is not None and not isinstance(leaf.training_args, expected):
        raise ValueError(
            f"{where}: training_args is a {type(leaf.training_args).__name__}, but trainer_type={trainer_type!r} "
            f"needs an RF{expected.__name__} (or trl.{expected.__name__})"
        )
    if leaf.peft_config is not None and not isinstance(leaf.peft_config, PeftConfig):
        raise ValueError(
            f"{where}: peft_config must be an RFLoraConfig or a peft.PeftConfig, got {type(leaf.peft_config).__name__}"
        )
    for name in ("formatting_func", "compute_metrics"):
        value = getattr(leaf, name)
        if value is not None and not callable(value):
            raise ValueError(f"{where}: {name} must be callable, got {type(value).__name__}")
    if leaf.generation_config is not None and not isinstance(leaf.generation_config, dict):
        raise ValueError(f"{where}: generation_config must be a dict of generate() arguments")
    if leaf.generation_config is not None and leaf.compute_metrics is None:
        warnings.warn(f"{where}: generation_config has no effect without compute_metrics", stacklevel=3)


class _Search:
    """Common part: the trainer type and the checked leaves."""

    def __init__(self, configs: Any, trainer_type: str | None):
        trainer_type = "SFT" if trainer_type is None else str(trainer_type).upper()
        if trainer_type not in TRAINER_TYPES:
            raise ValueError(f"trainer_type={trainer_type!r} is invalid; use one of {', '.join(TRAINER_TYPES)}")
        self.trainer_type = trainer_type
        self.configs = _normalize(configs)
        self.leaves: list[RFModelConfig] = self._expand()
        for index, leaf in enumerate(self.leaves):
            if has_space(leaf):  # a search bug, never the user's
                raise AssertionError(f"leaf {index} still holds a List/Range")
            check_leaf(leaf, trainer_type, f"run {index + 1} (leaf {index} of {type(self).__name__})")

    def _expand(self) -> list[RFModelConfig]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.leaves)

    def __iter__(self) -> Iterator[RFModelConfig]:
        return iter(self.leaves)

    def __getitem__(self, index: int) -> RFModelConfig:
        return self.leaves[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} runs, trainer_type={self.trainer_type!r})"


class RFGridSearch(_Search):
    """Every combination of the `List` values in `configs`.

    Args:
        configs (`RFModelConfig`, `list` or `List` of them): The templates.
        trainer_type (`str`, *optional*, defaults to `"SFT"`): "SFT", "DPO" or "GRPO".
    """

    def __init__(self, configs: Any, trainer_type: str | None = "SFT"):
        super().__init__(configs, trainer_type)

    def _expand(self) -> list[RFModelConfig]:
        return [leaf for i, config in enumerate(self.configs) for leaf in grid_expand(config, f"configs[{i}]")]


class RFRandomSearch(_Search):
    """`num_runs` random draws from `configs`.

    Args:
        configs (`RFModelConfig`, `list` or `List` of them): The templates.
        trainer_type (`str`, *optional*, defaults to `"SFT"`): "SFT", "DPO" or "GRPO".
        num_runs (`int`, *optional*, defaults to `1`): How many distinct leaves to draw.
        seed (`int`, *optional*, defaults to `42`): Seed of the draws (the only source of randomness).
    """

    def __init__(self, configs: Any, trainer_type: str | None = "SFT", num_runs: int = 1, seed: int = 42):
        if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
            raise ValueError(f"num_runs={num_runs!r} is invalid; it must be an int >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid; it must be an int")
        self.num_runs, self.seed = num_runs, seed
        super().__init__(configs, trainer_type)

    def _expand(self) -> list[RFModelConfig]:
        rng = random.Random(self.seed)
        leaves, seen = [], set()
        for _ in range(10 * self.num_runs):
            leaf = sample(rng.choice(self.configs), rng)
            key = repr(leaf)
            if key not in seen:
                seen.add(key)
                leaves.append(leaf)
                if len(leaves) == self.num_runs:
                    return leaves
        raise ValueError(
            f"could draw only {len(leaves)} distinct configs of the num_runs={self.num_runs} asked for "
            f"(after {10 * self.num_runs} draws); the search space is smaller: lower num_runs or use RFGridSearch"
        )
