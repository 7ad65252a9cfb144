"""Fast unit tests of the engine's pure parts, without a model: the data plan and epoch order (`chunks.py`), the
coordinator's chunk-major order (`coordinator.py`), config parsing (`configs.py`), op parsing (`ops.py`), the policies'
view and set (`policies.py`, `policy_set.py`) and a clone's optimizer moments (`parking.py`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.data_loader import SeedableRandomSampler
from helpers import cpu_sft_config
from peft import LoraConfig, PromptTuningConfig

from rf_callbacks.checkpoint import Checkpoints
from rf_callbacks.chunks import DataPlan, check_num_chunks, epoch_order
from rf_callbacks.configs import RunSpec, parse_configs
from rf_callbacks.coordinator import Coordinator
from rf_callbacks.ops import Op, OpError, merge_peft_overrides, parse_request
from rf_callbacks.policies import BoundaryView
from rf_callbacks.run import RECORD_FIELDS, Run
from rf_callbacks.trainers.sft import SFT_PER_RUN_FIELDS

LORA = LoraConfig(r=4, target_modules=["q_proj"])


# -- DataPlan and the epoch order ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 42])
def test_epoch_order_is_accelerates_seedable_sampler(seed):
    """One config reproduces plain TRL because each epoch's row order is the one `Trainer`'s sampler gives."""
    sampler = SeedableRandomSampler(range(23), data_seed=seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert epoch_order(23, epoch, seed, shuffle=True) == tuple(sampler)
    assert epoch_order(5, 1, seed, shuffle=False) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize(
    "rows, batch, accum, drop_last, steps_per_epoch",
    [(17, 8, 1, False, 3), (17, 8, 1, True, 2), (100, 4, 3, False, 9), (8, 8, 4, False, 1), (96, 8, 2, False, 6)],
)
def test_steps_per_epoch_follow_trainer(rows, batch, accum, drop_last, steps_per_epoch):
    # Trainer: ceil(len(dataloader) / gradient_accumulation_steps) optimizer steps per epoch, at least one
    plan = DataPlan.build(rows, batch, accum, 1, max_steps=-1, num_train_epochs=2.5, drop_last=drop_last)
    batches = rows // batch if drop_last else math.ceil(rows / batch)
    assert plan.batches_per_epoch == batches
    assert plan.steps_per_epoch == steps_per_epoch == max(math.ceil(batches / accum), 1)
    assert plan.max_steps == math.ceil(2.5 * steps_per_epoch)  # epochs count only without max_steps
    assert DataPlan.build(rows, batch, accum, 1, max_steps=5, num_train_epochs=2.5).max_steps == 5


@pytest.mark.parametrize("steps, chunks", [(10, 3), (7, 7), (12, 4), (5, 1)])
def test_chunks_cut_an_epoch_into_contiguous_near_equal_slices(steps, chunks):
    plan = DataPlan.build(steps * 2, 2, 1, chunks, max_steps=-1, num_train_epochs=1)
    bounds = [plan.chunk_bounds(c) for c in range(chunks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == steps
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # every step in exactly one chunk
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    assert [plan.chunk_of_step(step) for step in range(steps)] == [
        c for c, (s, e) in enumerate(bounds) for _ in range(s, e)
    ]


def test_slices_cover_the_budget_and_stop_at_max_steps():
    plan = DataPlan.build(40, 4, 1, 4, max_steps=25, num_train_epochs=1)  # 10 steps per epoch, 2.5 epochs
    assert (plan.steps_per_epoch, plan.num_epochs, plan.num_slices) == (10, 3, 10)  # the last epoch's 2 chunks
    covered = []
    for index in range(plan.start_slice, plan.end_slice):
        epoch, first, end = plan.slice_steps(index)
        covered += [epoch * plan.steps_per_epoch + step for step in range(first, end)]
    assert covered == list(range(25))
    # a run stopped mid-chunk (3 of slice 1's steps 2..5 done after slice 0) resumes where it left off
    assert plan.slice_steps(1, steps_done=3) == (0, 3, 5)


def test_a_clone_that_continues_its_parent_counts_its_budget_from_there():
    plan = DataPlan.build(40, 4, 1, 4, max_steps=6, num_train_epochs=1, start_slice=3)  # slice 3 = steps 7..10
    assert plan.start_step == 7
    # 3 steps in slice 3, 2 in slice 4 (epoch 1, chunk 0), the last one in slice 5
    assert [plan.slice_steps(index) for index in (3, 4, 5)] == [(0, 7, 10), (1, 0, 2), (1, 2, 3)]
    assert (plan.end_slice, plan.num_slices) == (6, 3)


def test_a_stream_plan_is_its_max_steps():
    plan = DataPlan.build(0, 4, 2, 3, max_steps=9, num_train_epochs=1, stream=True)
    assert (plan.num_rows, plan.steps_per_epoch, plan.num_slices) == (72, 9, 3)


def test_plan_errors_name_the_run_and_the_numbers():
    with pytest.raises(
        ValueError, match=r"num_chunks=4 is more than run 'a' has optimizer steps per epoch \(3: 17 rows"
    ):
        DataPlan.build(17, 8, 1, 4, max_steps=-1, num_train_epochs=1).check("a")
    DataPlan.build(17, 8, 1, 4, max_steps=-1, num_train_epochs=1).check("a", chunks=False)  # drop-in: no chunks
    with pytest.raises(ValueError, match="run 'b' has no training batch.*dataloader_drop_last=True"):
        DataPlan.build(3, 8, 1, 1, max_steps=-1, num_train_epochs=1, drop_last=True).check("b")
    for bad in (0, -1, 1.5, True, "4", None):
        with pytest.raises(ValueError, match=f"num_chunks={bad!r} is invalid"):
            check_num_chunks(bad)
    check_num_chunks("auto")


# -- Coordinator -----------------------------------------------------------------------------------------------------


def _run(name, tmp_path, max_steps=4, chunks=2, start_slice=0):
    spec = RunSpec(name, None, {}, cpu_sft_config(tmp_path / name))
    plan = DataPlan.build(8, 2, 1, chunks, max_steps=max_steps, num_train_epochs=1, start_slice=start_slice)
    return Run(spec=spec, plan=plan, data_key=(), next_slice=start_slice)


def test_coordinator_trains_chunk_major_in_config_order(tmp_path):
    runs = Coordinator([_run("a", tmp_path), _run("b", tmp_path, max_steps=2), _run("c", tmp_path)])
    order = []
    while (run := runs.next_run()) is not None:
        order.append((run.name, run.next_slice))
        run.next_slice += 1
        if run.next_slice >= run.plan.end_slice:
            run.status = "completed"
    # b's budget ends after slice 0 and it drops out; nobody starts slice 1 before everyone has finished slice 0
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1)]


def test_coordinator_skips_stopped_runs_and_counts_no_deleted_steps(tmp_path):
    a, b, c = _run("a", tmp_path), _run("b", tmp_path), _run("c", tmp_path, start_slice=1)
    runs = Coordinator([a, b, c])
    a.status, b.next_slice = "stopped", 1
    assert runs.next_run() is b  # the frontier is slice 1; b comes before c in config order
    b.status = "deleted"
    assert runs.next_run() is c and runs.active() == [c]
    assert runs.total_steps() == a.plan.max_steps + c.plan.max_steps
    c.status = "completed"
    assert runs.next_run() is None


def test_the_frontier_is_the_smallest_next_slice_of_the_active_runs(tmp_path):
    a, b, c = _run("a", tmp_path, start_slice=1), _run("b", tmp_path), _run("c", tmp_path)
    runs = Coordinator([a, b, c])
    assert runs.frontier() == 0 and runs.frontier_runs() == [b, c]
    b.status, c.next_slice = "completed", 1
    assert runs.frontier() == 1 and runs.frontier_runs() == [a, c]
    a.status = c.status = "stopped"
    assert runs.frontier() is None and runs.frontier_runs() == [] and runs.next_run() is None


def test_the_boundary_view_shows_every_run_and_the_frontier(tmp_path):
    a, b, c = _run("a", tmp_path, start_slice=1), _run("b", tmp_path), _run("c", tmp_path)
    runs = Coordinator([a, b, c])
    view = BoundaryView.of("a", runs, num_chunks=2)
    assert (view.run, view.frontier, view.num_chunks) == ("a", 0, 2)
    assert [(v.name, v.index, v.slices, v.metrics) for v in view.runs.values()] == [
        ("a", 0, 1, {}),
        ("b", 1, 0, {}),
        ("c", 2, 0, {}),
    ]
    b.status, c.status = "deleted", "completed"
    a.status, a.next_slice = "stopped", 2
    view = BoundaryView.of("c", runs, num_chunks=2)
    assert view.frontier == 2 and view.active() == []  # no run active: the last boundary any run reached


def test_a_run_record_round_trips_every_record_field(tmp_path):
    a, b = _run("a", tmp_path), _run("b", tmp_path)
    a.status, a.next_slice, a.slices_done, a.wall_time, a.error, a.reason = "stopped", 3, 3, 1.5, "e", "why"
    a.last_step, a.train_metrics, a.oom_retry = (torch.tensor(0.25), 1e-3), {"train_loss": 2.0}, {"steps": 1}
    a.clone = {"parent": "b"}
    record = a.record()
    assert set(record) == {"name", *RECORD_FIELDS} and record["last_step"] == [0.25, 1e-3]
    assert json.loads(json.dumps(record)) == record  # checkpoints keep it as JSON
    b.load_record(record)
    assert all(getattr(b, key) == getattr(a, key) for key in RECORD_FIELDS if key not in ("last_step", "clone"))
    assert b.last_step == (0.25, 1e-3) and b.clone is None  # a clone is rebuilt from its own record


def test_checkpoints_are_due_every_n_boundaries_and_at_the_end():
    schedule = Checkpoints(every=2, keep=2)
    schedule.passed()
    assert not schedule.due(True) and schedule.due(True, final=True) and not schedule.due(False, final=True)
    schedule.passed()
    assert schedule.due(True) and schedule.boundaries == 2
    schedule.written()
    assert not schedule.due(True, final=True) and schedule.last is None and schedule.boundaries == 2
    assert not Checkpoints(every=None, keep=2).due(True, final=True)


def test_coordinator_is_a_read_only_mapping_of_names(tmp_path):
    a = _run("a", tmp_path)
    runs = Coordinator([a, _run("b", tmp_path)])
    assert list(runs.keys()) == ["a", "b"] and [run.name for run in runs] == ["a", "b"] and len(runs) == 2
    assert "a" in runs and a in runs and "z" not in runs and _run("a", tmp_path) not in runs
    with pytest.raises(KeyError, match=r"unknown run 'z'; runs are \['a', 'b'\]"):
        runs["z"]


# -- Config parsing --------------------------------------------------------------------------------------------------


def parse(configs, peft_config=LORA, **args):
    base = cpu_sft_config("unused", max_steps=10, learning_rate=2e-5, **args)
    return parse_configs(configs, base, peft_config, SFT_PER_RUN_FIELDS, lambda name: f"out/runs/{name}")


def test_configs_become_run_specs_with_their_own_arguments():
    specs = parse([{"name": "x", "learning_rate": 3e-4}, {"peft_config": LoraConfig(r=16), "max_length": 64}])
    assert [spec.name for spec in specs] == ["x", "run-2"]
    assert specs[0].args.learning_rate == 3e-4 and specs[1].args.learning_rate == 2e-5  # the shared args'
    assert specs[1].args.max_length == 64 and specs[1].peft_config.r == 16 and specs[0].peft_config.r == 4
    assert specs[0].args.output_dir == "out/runs/x"
    assert specs[0].peft_config is not LORA  # each run gets its own copy
    assert parse([{"warmup_ratio": 0.1}])[0].args.warmup_steps == 0.1  # transformers 5 spells a ratio this way
    assert [spec.name for spec in parse(None)] == ["run-1"]


@pytest.mark.parametrize(
    "configs, message",
    [
        ({"learning_rate": 1e-3}, "configs must be a list of dicts, got dict"),
        ([], "configs is empty"),
        (["lr=1e-3"], r"configs\[0\] must be a dict, got str"),
        ([{"name": "a b"}], r"configs\[0\]: name='a b' is invalid"),
        ([{"name": "a"}, {"name": "a"}], r"duplicate run name 'a' \(also configs\[0\]\)"),
        ([{"name": "a.1"}, {"name": "a_1"}], "differ only by '.' vs '_'"),
        ([{"learning_rat": 1e-3}], r"unknown field 'learning_rat'.*learning_rate"),
        ([{"bf16": True}], r"bf16=True cannot differ per run in one process \(the base model's precision"),
        ([{"beta": 0.1}], "'beta' is a field of DPOConfig, not of SFTConfig"),
        ([{"learning_rate": "fast"}], "learning_rate"),
        ([{"learning_rate": -1.0}], "learning_rate"),
        ([{"num_train_epochs": 2}], r"would be ignored because args.max_steps=10 takes precedence"),
        ([{"warmup_ratio": 1.5}], r"warmup_ratio=1.5 is invalid"),
        ([{"peft_config": {"r": 8}}], "peft_config must be a peft.PeftConfig"),
        ([{"peft_config": LORA}, {"peft_config": PromptTuningConfig(num_virtual_tokens=4)}], "same PEFT method"),
    ],
)
def test_bad_configs_are_refused_naming_the_config_and_the_field(configs, message):
    with pytest.raises(ValueError, match=message):
        parse(configs)


def test_several_configs_need_an_adapter_each():
    with pytest.raises(ValueError, match=r"configs\[0\] \('run-1'\) has no peft_config and the trainer has none"):
        parse([{}, {}], peft_config=None)


# -- Op parsing ------------------------------------------------------------------------------------------------------


def test_requests_become_ops_or_reads():
    op = parse_request(
        {"op": "clone", "run": "a", "overrides": {"peft_config.r": 16}, "warm_start": True, "by": "cli"}
    )
    assert isinstance(op, Op) and (op.kind, op.run, op.warm_start, op.source) == ("clone", "a", True, "cli")
    assert op.describe() == {"op": "clone", "target": "a", "by": "cli", "overrides": {"peft_config.r": 16},
                             "warm_start": True, "name": None}  # fmt: skip
    assert parse_request({"op": "stop", "run": "b"}).source == "socket"
    assert parse_request({"op": "metrics", "run": "a"}) == ("metrics", {"run": "a", "last": 50})
    assert parse_request({"op": "ls"}) == ("ls", {})
    assert merge_peft_overrides({"learning_rate": 1e-4, "peft_config": {"r": 8}, "peft_config.lora_alpha": 16}) == (
        {"learning_rate": 1e-4},
        {"r": 8, "lora_alpha": 16},
    )


def test_an_op_record_round_trips_and_a_ledger_record_gives_the_op_back():
    op = Op("clone", "a", {"learning_rate": 1e-4}, True, True, "a2", source="dashboard", reason="why")
    back = Op.from_record(json.loads(json.dumps(op.record())))
    assert (back.kind, back.run, back.overrides, back.warm_start, back.copy_optimizer, back.name, back.source,
            back.reason) == ("clone", "a", {"learning_rate": 1e-4}, True, True, "a2", "dashboard", "why")  # fmt: skip
    described = Op.from_described(op.describe())
    assert described.record() == op.record()
    stop = Op("stop", "b", source="cli")
    assert Op.from_described(stop.describe()).record() == stop.record()


@pytest.mark.parametrize(
    "request_, message",
    [
        ([1, 2], "a request must be a JSON object, got list"),
        ({"run": "a"}, "missing field 'op'"),
        ({"op": "pause", "run": "a"}, "unknown op 'pause'; ops are"),
        ({"op": "stop"}, "missing field 'run'"),
        ({"op": "stop", "run": 3}, "field 'run' must be str, got int"),
        ({"op": "stop", "run": "a", "force": True}, r"unknown field\(s\) \['force'\] for op 'stop'"),
        ({"op": "clone", "run": "a", "warm_start": 1}, "field 'warm_start' must be bool, got int"),
        ({"op": "metrics", "last": 0}, "field 'last' must be >= 1, got 0"),
        ({"op": "metrics", "last": True}, "field 'last' must be int, got bool"),
        ({"op": "stop", "run": "a", "by": "rm -rf"}, "field 'by' must be a short identifier"),
    ],
)
def test_bad_requests_say_what_is_wrong(request_, message):
    with pytest.raises(OpError, match=message):
        parse_request(request_)


def test_a_policy_set_keeps_each_state_with_its_policy_after_one_is_disabled():
    from rf_callbacks.policies import DivergenceGuard, SuccessiveHalving
    from rf_callbacks.policy_set import PolicySet

    first, second = SuccessiveHalving(eta=2), SuccessiveHalving(eta=3)
    second.rung = 2  # the built-in policies keep their memory in non-init fields
    policies = PolicySet([first, DivergenceGuard(), second])
    policies.disable(first)
    assert list(policies) == policies.given[1:] and len(policies) == 2
    state = json.loads(json.dumps(policies.state_dict()))  # as a checkpoint or another rank receives it

    resumed = PolicySet([SuccessiveHalving(eta=2), DivergenceGuard(), SuccessiveHalving(eta=3)])
    resumed.load_state_dict(state)
    assert [type(p).__name__ for p in resumed] == ["DivergenceGuard", "SuccessiveHalving"]
    assert list(resumed)[1].rung == 2 and resumed.given[0].rung == 0
    assert resumed.names() == {"SuccessiveHalving", "DivergenceGuard"}

    old = PolicySet([SuccessiveHalving(eta=2)])  # a checkpoint's list of states from before the enabled positions
    old.load_state_dict([{"rung": 1, "done": False}])
    assert list(old)[0].rung == 1


def test_a_policy_set_submits_each_policys_ops_and_disables_a_broken_policy():
    from rf_callbacks.policy_set import PolicySet

    class Stopper:
        def on_boundary(self, view):
            return [Op("stop", view.run), Op("delete", "b", source="mine")]

    class Broken:
        def on_boundary(self, view):
            return ["not an op"]

    class Refused:
        def on_boundary(self, view):
            return [Op("resume", view.run)]

    view = BoundaryView(run="a", frontier=1, num_chunks=2, runs={})
    submitted, failures = [], []

    def submit(op):
        if op.kind == "resume":
            raise OpError("run 'a' is not stopped")  # a refused op is the ledger's, not the policy's failure
        submitted.append((op.kind, op.run, op.source))

    policies = PolicySet([Stopper(), Broken(), Refused()])
    policies.ask(view, submit, lambda name, error: failures.append((name, type(error).__name__)))
    assert submitted == [("stop", "a", "Stopper"), ("delete", "b", "mine")]
    assert failures == [("Broken", "TypeError")]
    assert [type(p).__name__ for p in policies] == ["Stopper", "Refused"]
    policies.ask(view, submit, lambda name, error: failures.append(name))
    assert len(submitted) == 4 and failures == [("Broken", "TypeError")]  # the broken policy is asked no more


def test_a_clones_optimizer_takes_the_parents_moments_and_keeps_its_own_hyper_parameters():
    from rf_callbacks.parking import load_moments

    parent_weight, child_weight = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    parent = torch.optim.AdamW([parent_weight], lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    parent_weight.grad = torch.tensor([1.0, -2.0, 3.0])
    parent.step()
    child = torch.optim.AdamW([child_weight], lr=5e-4, betas=(0.9, 0.99), weight_decay=0.0)
    load_moments(child, parent.state_dict())
    moments = child.state[child_weight]
    assert torch.equal(moments["exp_avg"], parent.state[parent_weight]["exp_avg"])
    assert torch.equal(moments["exp_avg_sq"], parent.state[parent_weight]["exp_avg_sq"])
    group = child.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (5e-4, (0.9, 0.99), 0.0)
