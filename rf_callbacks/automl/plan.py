"""From a search's leaves to trainer groups: formatted data, each leaf's arguments, and which leaves share a trainer.

A group is what one `RFSFTTrainer` trains at once: leaves on the same base (model_name, model_type, model_kwargs,
tokenizer, tokenizer_kwargs), with the same formatting_func, PEFT method and trainer-wide `compute_metrics`/
`reward_funcs`, and equal values in every training-argument field that cannot differ per run inside one trainer
(`bf16`, `packing`, `data_seed`, ... : everything outside the trainer's `per_run_fields`). Leaves join the first
group they fit, in run order; groups on the same base are ordered next to each other so each base is loaded once.
Within a group the first leaf's arguments are the shared `args` and every other leaf passes the per-run fields in
which it differs as overrides.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configs import describe_config
from .configs import RF_TRAINING_ARGS_CLASSES, RFModelConfig

# Column sets a formatted row may have, per trainer type (any one of them).
ACCEPTED_COLUMNS = {
    "SFT": (("prompt", "completion"), ("messages",), ("text",), ("input_ids",)),
    "DPO": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "GRPO": (("prompt",),),
}


def _wanted(trainer_type: str) -> str:
    return ", ".join("+".join(columns) for columns in ACCEPTED_COLUMNS[trainer_type])


def format_dataset(dataset: Any, func: Any, trainer_type: str, name: str) -> Any:
    """Apply `func` to every row (once), checking each returned dict; the original columns it drops are removed."""
    if dataset is None or func is None:
        return dataset
    if isinstance(dataset, dict):
        return {key: format_dataset(value, func, trainer_type, f"{name}[{key!r}]") for key, value in dataset.items()}
    from datasets import Dataset

    label = getattr(func, "__name__", repr(func))
    rows = []
    for index, row in enumerate(dataset):
        out = func(row)
        keys = sorted(out) if isinstance(out, dict) else None
        if keys is None or not any(set(columns) <= set(keys) for columns in ACCEPTED_COLUMNS[trainer_type]):
            got = f"keys {keys}" if keys is not None else f"a {type(out).__name__}"
            raise ValueError(
                f"formatting_func {label!r} returned {got} for {name} row {index}; "
                f"{trainer_type} needs a dict with one of: {_wanted(trainer_type)}"
            )
        rows.append(out)
    return Dataset.from_list(rows)


def check_columns(dataset: Any, trainer_type: str, name: str) -> None:
    """Refuse unformatted data that lacks the columns the trainer type needs."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_columns(value, trainer_type, f"{name}[{key!r}]")
        return
    columns = set(getattr(dataset, "column_names", None) or [])
    if not any(set(needed) <= columns for needed in ACCEPTED_COLUMNS[trainer_type]):
        raise ValueError(
            f"{name} has columns {sorted(columns)}, but {trainer_type} needs one of: {_wanted(trainer_type)}; "
            "pass a formatting_func in the RFModelConfig to map your rows"
        )


def _user_set(args: Any, key: str) -> bool:
    """Whether the user set `key`: known for RF configs; for TRL's own, a value other than the class default."""
    given = getattr(args, "user_params", None)
    if given is not None:
        return key in given
    return getattr(args, key) != type(args).__dataclass_fields__[key].default


def leaf_args(leaf: RFModelConfig, trainer_type: str, seed: int, on_cuda: bool):
    """The leaf's concrete training arguments, with what RapidFire AI's runs also get: run_fit's `seed` and
    `save_strategy="no"` (the final adapter is saved anyway) where the leaf set none; and on CPU, no mixed precision
    and no checkpointing (fp16 fails there and bf16 is ~30x slower)."""
    args = leaf.training_args
    if args is None:
        args = RF_TRAINING_ARGS_CLASSES[trainer_type]()
    changes: dict[str, Any] = {}
    if not _user_set(args, "seed"):
        changes["seed"] = seed
    if not _user_set(args, "save_strategy"):
        changes["save_strategy"] = "no"
    if not on_cuda:
        changes.update(bf16=False, fp16=False, gradient_checkpointing=False)
        if "activation_checkpointing" in args.__dataclass_fields__:  # the new name of gradient_checkpointing
            changes["activation_checkpointing"] = False
    changes = {key: value for key, value in changes.items() if getattr(args, key) != value}
    return dataclasses.replace(args, **changes) if changes else args


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(item) for item in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return getattr(value, "__name__", None) or str(getattr(value, "value", value))


def leaf_summary(leaf: RFModelConfig) -> dict[str, Any]:
    """What makes this run: model, adapter fields, the training arguments the user set, and the functions used."""
    summary: dict[str, Any] = {"model_name": leaf.model_name}
    if leaf.peft_config is not None:
        summary.update(describe_config(leaf.peft_config, {}))
    args = leaf.training_args
    if args is not None:
        given = getattr(args, "user_params", None)
        if given is None:  # a plain TRL config: the fields that differ from the class defaults
            given = {
                f.name: getattr(args, f.name)
                for f in dataclasses.fields(args)
                if f.init and f.default is not dataclasses.MISSING and getattr(args, f.name) != f.default
            }
        summary.update({key: _jsonable(value) for key, value in given.items() if key != "output_dir"})
    for name in ("model_kwargs", "formatting_func", "compute_metrics", "generation_config", "reward_funcs"):
        value = getattr(leaf, name)
        if value is not None:
            summary[name] = _jsonable(value)
    return summary


def base_key(leaf: RFModelConfig) -> str:
    """Leaves with equal keys share one `create_model_fn` call."""
    parts = [leaf.model_name, leaf.model_type, leaf.model_kwargs, leaf.tokenizer, leaf.tokenizer_kwargs]
    return json.dumps(parts, sort_keys=True, default=repr)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. objects whose == is elementwise
        return repr(a) == repr(b)


@dataclass
class Member:
    run_id: int
    leaf: RFModelConfig
    args: Any

    @property
    def name(self) -> str:
        return f"run-{self.run_id}"


@dataclass
class Group:
    """Leaves trained together by one trainer; `members[0].args` are the shared arguments."""

    base: str
    members: list[Member] = field(default_factory=list)

    @property
    def ref(self) -> Member:
        return self.members[0]

    def accepts(self, member: Member, trainer_type: str, shared_fields: list[str]) -> bool:
        ref, leaf = self.ref.leaf, member.leaf
        hf_metrics = lambda x: x.compute_metrics if x.generation_config is None else None  # noqa: E731
        return (
            base_key(leaf) == self.base
            and leaf.formatting_func is ref.formatting_func
            and hf_metrics(leaf) is hf_metrics(ref)
            and (trainer_type != "GRPO" or _same(leaf.reward_funcs, ref.reward_funcs))
            and (leaf.ref_model_name, _same(leaf.ref_model_kwargs, ref.ref_model_kwargs)) == (ref.ref_model_name, True)
            and getattr(leaf.peft_config, "peft_type", None) == getattr(ref.peft_config, "peft_type", None)
            and type(member.args) is type(self.ref.args)
            and all(_same(getattr(member.args, key), getattr(self.ref.args, key)) for key in shared_fields)
        )

    def overrides(self, member: Member, per_run_fields: frozenset[str]) -> dict[str, Any]:
        """The per-run fields in which `member` differs from the shared arguments."""
        names = {f.name for f in dataclasses.fields(member.args) if f.init} & set(per_run_fields)
        shared = self.ref.args
        changed = {
            key: getattr(member.args, key)
            for key in sorted(names)
            if not _same(getattr(member.args, key), getattr(shared, key))
        }
        if member.args.max_steps > 0:  # epochs are ignored when max_steps is set; the core refuses them alone
            changed.pop("num_train_epochs", None)
        return changed


def plan_groups(members: list[Member], trainer_type: str, per_run_fields: frozenset[str]) -> list[Group]:
    """Groups in training order: by base (first appearance), then by creation."""
    groups: list[Group] = []
    for member in members:
        init = [f.name for f in dataclasses.fields(member.args) if f.init]
        shared_fields = [key for key in init if key not in per_run_fields and key != "output_dir"]
        group = next((g for g in groups if g.accepts(member, trainer_type, shared_fields)), None)
        if group is None:
            group = Group(base_key(member.leaf))
            groups.append(group)
        group.members.append(member)
    first_seen = {}
    for index, group in enumerate(groups):
        first_seen.setdefault(group.base, index)
    return sorted(groups, key=lambda group: first_seen[group.base])


@dataclass
class Job:
    """One group, ready for its trainer: output folder, shared arguments, `configs=` list and formatted data."""

    group: Group
    folder: Path
    args: Any
    configs: list[dict[str, Any]]
    train: Any
    eval: Any


def plan_jobs(
    search,
    trainer_cls,
    train_dataset,
    eval_dataset,
    num_chunks: int,
    seed: int,
    *,
    folder: Callable,
    first_run_id: int,
    first_group: int,
) -> list[Job]:
    """Format the data once per formatting_func, group the leaves, and check every group as its trainer would
    (configs, data columns, chunks per epoch), all before any model is created."""
    import torch

    from ..chunks import DataPlan
    from ..configs import parse_configs

    trainer_type, leaves = search.trainer_type, list(search)
    if len(leaves) > 1 and any(leaf.peft_config is None for leaf in leaves):
        raise ValueError(
            "every leaf needs a peft_config when there are several: runs are adapters on one shared base model "
            "(a leaf without one would fine-tune, and change, the base of the others)"
        )
    if trainer_type != "DPO" and any(leaf.ref_model_name for leaf in leaves):
        raise ValueError(f"ref_model_name is only used by trainer_type='DPO', got it with {trainer_type!r}")
    data: dict[int, tuple[Any, Any]] = {}
    for leaf in leaves:
        func = leaf.formatting_func
        if id(func) not in data:
            train = format_dataset(train_dataset, func, trainer_type, "train_dataset")
            evals = format_dataset(eval_dataset, func, trainer_type, "eval_dataset")
            check_columns(train, trainer_type, "train_dataset")
            check_columns(evals, trainer_type, "eval_dataset")
            data[id(func)] = (train, evals)
    on_cuda = torch.cuda.is_available()
    members = [
        Member(first_run_id + i, leaf, leaf_args(leaf, trainer_type, seed, on_cuda)) for i, leaf in enumerate(leaves)
    ]
    jobs = []
    for k, group in enumerate(plan_groups(members, trainer_type, trainer_cls.per_run_fields), start=first_group):
        out = Path(folder(k))
        args = dataclasses.replace(group.ref.args, output_dir=str(out))
        configs = [
            {"name": m.name, "peft_config": m.leaf.peft_config, **group.overrides(m, trainer_cls.per_run_fields)}
            for m in group.members
        ]
        specs = parse_configs(
            configs, args, None, trainer_cls.per_run_fields, lambda name, out=out: out / "runs" / name
        )
        train, evals = data[id(group.ref.leaf.formatting_func)]
        for spec in specs:
            plan = DataPlan.build(
                len(train),
                spec.args.per_device_train_batch_size * max(1, spec.args.n_gpu),
                spec.args.gradient_accumulation_steps,
                num_chunks,
                spec.args.max_steps,
                spec.args.num_train_epochs,
                spec.args.dataloader_drop_last,
            )
            plan.check(spec.name)
        jobs.append(Job(group, out, args, configs, train, evals))
    return jobs
