"""`RFArgs`: the rf-callbacks options, one list taken identically by `RFSFTTrainer`, `RFDPOTrainer` and
`RFGRPOTrainer` (keyword-only, after the TRL parent's own arguments), validated once, before any work.

Each trainer's `__init__` takes them as `**options: Unpack[RFOptions]` (so type checkers and editors know every
name and type) and `with_options` writes them into its signature (so `inspect.signature`, `help()` and argument
binding see them as keyword-only parameters with their defaults): the trainers do not list them again."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from .chunks import check_num_chunks

PARALLEL_MODES = ("auto", "configs", "data")


@dataclass
class RFArgs:
    """
    The rf-callbacks options of an RF trainer. Each trainer takes them as keyword arguments of the same names (its
    `__init__` builds this object); with every option at its default and no `configs`, the trainer is its TRL parent.

    Usage:
    ```python
    from rf_callbacks import RFArgs

    RFArgs(num_chunks=8, checkpoint_every=2)  # what RFSFTTrainer(..., num_chunks=8, checkpoint_every=2) checks
    ```
    """

    num_chunks: int | str = field(
        default="auto",
        metadata={
            "help": (
                "Chunks per epoch. Runs rotate at chunk boundaries, where each run is also evaluated. `'auto'`: 4, or"
                " fewer when a run has fewer optimizer steps per epoch (the choice is logged). An explicit number "
                "that a run cannot fit is refused."
            )
        },
    )
    offload_optimizer: bool | str = field(
        default=True,
        metadata={
            "help": (
                "On a CUDA machine, park a waiting run's optimizer state in pinned host memory (`True`), keep it on "
                "the device (`False`), or keep it on the device while at least 10% of the GPU stays free (`'auto'`). "
                "Ignored on CPU-only torch, where nothing moves."
            )
        },
    )
    control_socket: bool = field(
        default=True,
        metadata={
            "help": (
                "While `train()` runs, answer IC ops (stop, resume, delete, clone, ls, status, metrics) on the Unix "
                "socket `<output_dir>/control.sock` (mode 0600), which the `rf-callbacks` CLI and the dashboard use."
            )
        },
    )
    dashboard: bool = field(
        default=False,
        metadata={
            "help": (
                "While `train()` runs, serve the local web dashboard on 127.0.0.1 and print its URL (with its secret "
                "token), as `rf-callbacks dashboard --dir <output_dir>` does from another shell."
            )
        },
    )
    policies: list | None = field(
        default=None,
        metadata={
            "help": (
                "Automatic decisions at chunk boundaries (`rf_callbacks.policies`: `SuccessiveHalving`, "
                "`MedianStopping`, `DivergenceGuard`, `Explore`, or any object with `on_boundary(view) -> list[Op]`)."
                " They act through IC ops, recorded with their reasons."
            )
        },
    )
    boundary_eval: bool = field(
        default=True,
        metadata={
            "help": (
                "Evaluate each run at every chunk boundary it reaches. With `False`, a run is evaluated only where a "
                "policy needs it (e.g. `SuccessiveHalving`'s rungs), at its end, and where `eval_strategy` says."
            )
        },
    )
    checkpoint_every: int | None = field(
        default=None,
        metadata={
            "help": (
                "Boundaries between two experiment checkpoints in `<output_dir>/checkpoints` (default 1: every "
                "boundary, plus one when training ends); `save_strategy='no'` turns them off, `save_total_limit` "
                "(default 2) says how many are kept. `train(resume_from_checkpoint=True)` continues from the newest "
                "one, bit-for-bit."
            )
        },
    )
    fused: bool = field(
        default=False,
        metadata={
            "help": (
                "Train runs at the same chunk together: one forward and backward over their concatenated micro-"
                "batches, each LoRA layer applying each run's adapter to that run's rows, then each run's own "
                "optimizer step; results match rotation within 1e-4. Runs whose adapter is not plain LoRA on linear "
                "layers rotate as usual. Not with `RFGRPOTrainer`."
            )
        },
    )
    max_fused: int | str = field(
        default="auto",
        metadata={
            "help": (
                "Most runs in one fused group. `'auto'`: as many as the free memory holds, 4 until measured, 8 where "
                "the free memory cannot be read."
            )
        },
    )
    oom_retry: bool = field(
        default=False,
        metadata={
            "help": (
                "When a run's step runs out of memory in its forward or backward pass, go on from that optimizer step"
                " with `per_device_train_batch_size` halved and `gradient_accumulation_steps` doubled (same rows per "
                "optimizer step, data order and schedule), once per run, recorded in the ledger and `results()`. With"
                " `False` an out-of-memory error fails the run. Not with `RFGRPOTrainer` or a streamed train set."
            )
        },
    )
    parallel: str = field(
        default="auto",
        metadata={
            "help": (
                "Under `accelerate launch --num_processes N` (ignored in one process). `'configs'`: runs spread over "
                "the processes, each trained by one process at a time, bit-for-bit as in one process. `'data'`: all "
                "processes train the same run at once. `'auto'`: `'configs'` with at least N runs, else `'data'`."
            )
        },
    )

    def __post_init__(self):
        check_num_chunks(self.num_chunks)
        if self.offload_optimizer not in (True, False, "auto"):
            raise ValueError(f"offload_optimizer={self.offload_optimizer!r} is invalid; use True, False or 'auto'")
        for name in ("control_socket", "dashboard", "boundary_eval", "fused", "oom_retry"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; use True or False")
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"checkpoint_every must be an int >= 1 or None, got {every!r}")
        most = self.max_fused
        if most != "auto" and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
            raise ValueError(f"max_fused={most!r} is invalid; use an int >= 1 or 'auto'")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r} is invalid; use 'auto', 'configs' or 'data'")
        if self.dashboard and not self.control_socket:
            raise ValueError("dashboard=True needs control_socket=True (the page talks to the training through it)")


RF_OPTIONS: dict[str, Any] = {option.name: option.default for option in dataclasses.fields(RFArgs)}


class RFOptions(TypedDict, total=False):
    """`RFArgs`'s fields as a trainer's keyword arguments, for type checkers (`tests/test_rf_args.py` holds the two
    lists equal)."""

    num_chunks: int | str
    offload_optimizer: bool | str
    control_socket: bool
    dashboard: bool
    policies: list | None
    boundary_eval: bool
    checkpoint_every: int | None
    fused: bool
    max_fused: int | str
    oom_retry: bool
    parallel: str


def with_options(init: Callable[..., None]) -> Callable[..., None]:
    """Give a trainer's `__init__(..., *, configs=None, **options)` the signature its callers see: `**options`
    spelled out as `RFArgs`'s fields, keyword-only, with their defaults."""
    signature = inspect.signature(init)
    *named, options = signature.parameters.values()
    assert options.kind is inspect.Parameter.VAR_KEYWORD, f"{init.__qualname__} must end with **options"
    spelled = [
        inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=option.type)
        for option in dataclasses.fields(RFArgs)
    ]
    init.__signature__ = signature.replace(parameters=[*named, *spelled])  # type: ignore[attr-defined]
    return init


def options_doc(indent: str = "        ") -> str:
    """`RFArgs`'s fields as an HF-style `Args:` block, appended to each trainer's docstring (one source)."""
    lines = []
    for option in dataclasses.fields(RFArgs):
        kind = str(option.type).replace(" | None", "")
        default = f", defaults to `{option.default!r}`" if option.default is not None else ""
        lines.append(f"{indent}{option.name} (`{kind}`, *optional*{default}):")
        lines += textwrap.wrap(
            option.metadata["help"], 116, initial_indent=f"{indent}    ", subsequent_indent=f"{indent}    "
        )
    return "\n".join(lines)
