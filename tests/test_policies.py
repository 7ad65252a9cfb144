"""Automatic policies: scripted metric sequences on a fake view, then end to end on the tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import TrainerCallback, set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger
from rf_callbacks.ops import Op
from rf_callbacks.policies import (
    BoundaryView,
    DivergenceGuard,
    Explore,
    MedianStopping,
    MetricError,
    Policy,
    RunView,
    SuccessiveHalving,
)


def view(values, frontier, *, run=None, status=None, metric="eval_loss", history=None, lr=1e-3):
    """A fake boundary view: `values[name]` is each run's last `metric` (None: never logged)."""
    runs = {}
    for index, (name, value) in enumerate(values.items()):
        metrics = {} if value is None else {metric: value}
        runs[name] = RunView(
            name=name,
            status=(status or {}).get(name, "running"),
            index=index,
            slices=frontier,
            global_step=frontier * 2,
            max_steps=16,
            metrics=metrics,
            history=(history or {}).get(name, []),
            args=SimpleNamespace(learning_rate=lr * (index + 1), gradient_accumulation_steps=2),
        )
    return BoundaryView(run=run or next(iter(values)), frontier=frontier, num_chunks=8, runs=runs)


def apply(values, ops):
    """What the trainer does with stop/fail ops: the run leaves the rotation."""
    for op in ops:
        if op.kind in ("stop", "fail"):
            values.pop(op.run)
    return values


# --------------------------------------------------------------------------------------- scripted sequences
def test_successive_halving_rungs_and_reasons():
    policy = SuccessiveHalving(eta=2, min_chunks=1)
    values = {f"r{i}": 5.0 + i * 0.1 for i in range(8)}  # r0 best
    assert [policy.rung_slices(k) for k in range(4)] == [1, 2, 4, 8]
    ops = policy.on_boundary(view(values, 1))
    assert [op.run for op in ops] == ["r4", "r5", "r6", "r7"]
    assert all(op.kind == "stop" and op.source == "SuccessiveHalving" for op in ops)
    assert ops[0].reason == ("stopped by SuccessiveHalving at chunk 1 (rung 0, kept 4 of 8): eval_loss 5.4 > cut 5.3")
    apply(values, ops)
    values["r3"] = 4.0  # the order changes: r3 is now the best
    ops = policy.on_boundary(view(values, 2))
    assert sorted(op.run for op in ops) == ["r1", "r2"]
    apply(values, ops)
    assert policy.on_boundary(view(values, 3)) == []  # between rungs
    ops = policy.on_boundary(view(values, 4))
    assert [op.run for op in ops] == ["r0"]
    apply(values, ops)
    assert list(values) == ["r3"]
    assert policy.done and not policy.evaluates_at(8)  # nothing left to judge: no more rung evaluations
    assert SuccessiveHalving(eta=2).evaluates_at(4) and not SuccessiveHalving(eta=2).evaluates_at(3)
    for frontier in range(5, 20):  # the survivor is never stopped
        assert policy.on_boundary(view(values, frontier)) == []


def test_successive_halving_ties_missing_and_max_mode():
    ops = SuccessiveHalving(eta=2).on_boundary(view({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, 1))
    assert [op.run for op in ops] == ["c", "d"]  # ties: the earlier runs stay
    ops = SuccessiveHalving(eta=2).on_boundary(view({"a": None, "b": 2.0, "c": math.nan, "d": 3.0}, 1))
    assert [op.run for op in ops] == ["a", "c"]  # no value ranks last
    ops = SuccessiveHalving(eta=3, metric="acc", mode="max").on_boundary(
        view({"a": 0.1, "b": 0.9, "c": 0.5}, 1, metric="acc")
    )
    assert [op.run for op in ops] == ["c", "a"]
    assert "acc 0.5 < cut 0.9" in ops[0].reason
    assert SuccessiveHalving().on_boundary(view({"only": 9.0}, 1)) == []
    # A late first call (frontier past several rungs) applies them one after another, never below one run.
    policy = SuccessiveHalving(eta=2, min_chunks=2)
    assert policy.on_boundary(view({"a": 1.0, "b": 2.0, "c": 3.0}, 1)) == []
    ops = policy.on_boundary(view({"a": 1.0, "b": 2.0, "c": 3.0}, 8))
    assert [op.run for op in ops] == ["b", "c"]


def test_median_stopping_compares_running_peers_once_per_boundary():
    policy = MedianStopping(min_chunks=2)
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}
    assert policy.on_boundary(view(values, 1)) == []  # before min_chunks
    ops = policy.on_boundary(view(values, 2))
    assert [op.run for op in ops] == ["d", "e"]
    assert ops[0].reason == "stopped by MedianStopping at chunk 2: eval_loss 4 > median 3 of 5 runs"
    assert policy.on_boundary(view(values, 2)) == []  # another run reaching the same frontier: no second look
    apply(values, ops)
    assert [op.run for op in policy.on_boundary(view(values, 3))] == ["c"]
    assert MedianStopping(min_runs=3).on_boundary(view({"a": 1.0, "b": 2.0}, 1)) == []
    assert [op.run for op in MedianStopping(mode="max").on_boundary(view({"a": 1.0, "b": 2.0}, 1))] == ["a"]
    assert MedianStopping().on_boundary(view({"a": 1.0, "b": 1.0}, 1)) == []  # equal to the median is kept


def test_divergence_guard_nan_and_ratio_only_new_values():
    guard = DivergenceGuard(max_ratio=2.0)
    history = {"a": [{"loss": 4.0}, {"loss": 5.0}], "b": [{"loss": 4.0}, {"loss": math.inf}]}
    assert guard.on_boundary(view({"a": 1, "b": 1}, 1, run="a", history=history)) == []
    (op,) = guard.on_boundary(view({"a": 1, "b": 1}, 1, run="b", history=history))
    assert (op.kind, op.run, op.source) == ("fail", "b", "DivergenceGuard")
    assert op.reason == "failed by DivergenceGuard at step 2: loss is inf"
    history["a"] += [{"loss": 8.5}, {"loss": 3.0}]  # a spike between two boundaries is caught too
    (op,) = guard.on_boundary(view({"a": 1, "b": 1}, 2, run="a", history=history))
    assert "loss 8.5 > 2 x first 4" in op.reason
    history["a"].append({"loss": 3.0, "grad_norm": math.nan})  # what a filtered NaN step logs
    assert "grad_norm is nan" in guard.on_boundary(view({"a": 1}, 3, run="a", history=history))[0].reason
    history["a"].append({"loss": math.nan})
    assert guard.on_boundary(view({"a": 1}, 4, run="a", history=history, status={"a": "completed"})) == []


def test_explore_replaces_worst_with_perturbed_warm_clones_of_best():
    policy = Explore(top=0.25, perturb={"learning_rate": (0.5, 2.0), "gradient_accumulation_steps": (1.6,)})
    values = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0, "e": 5.0, "f": 2.5, "g": 2.2, "h": 2.1}
    assert policy.on_boundary(view(values, 1)) == []  # interval 2
    ops = policy.on_boundary(view(values, 2))
    assert [(op.kind, op.run) for op in ops] == [("stop", "e"), ("clone", "b"), ("stop", "d"), ("clone", "c")]
    clone = ops[1]
    assert clone.warm_start and clone.copy_optimizer and clone.source == "Explore"
    assert clone.overrides["max_steps"] == 16 - 4
    assert clone.overrides["gradient_accumulation_steps"] == 3  # int fields stay ints
    assert clone.overrides["learning_rate"] in (2e-3 * 0.5, 2e-3 * 2.0)
    again = Explore(top=0.25, perturb={"learning_rate": (0.5, 2.0), "gradient_accumulation_steps": (1.6,)})
    assert [op.overrides for op in again.on_boundary(view(values, 2))] == [op.overrides for op in ops]  # seeded
    assert Explore(top=3).on_boundary(view({"a": 1.0, "b": 2.0}, 2))[0].run == "b"  # at most half the runs


def test_a_metric_never_logged_or_nan_everywhere_is_not_ranked():
    values = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}
    typo = SuccessiveHalving(metric="eval_los")
    with pytest.raises(MetricError) as error:  # was: stop c and d "eval_los nan > cut nan", i.e. creation order
        typo.on_boundary(view(values, 1))
    assert str(error.value) == (
        "metric 'eval_los' was not logged by any run at rung 0 (chunk 1) (logged: eval_loss); "
        "did you mean 'eval_loss'?"
    )
    assert typo.rung == 0
    assert [op.run for op in SuccessiveHalving().on_boundary(view(values, 1))] == ["a", "d"]  # the right name halves
    for policy in (MedianStopping(metric="eval_los"), Explore(metric="eval_los")):
        with pytest.raises(MetricError, match="metric 'eval_los' was not logged by any run at chunk 2"):
            policy.on_boundary(view(values, 2))
    with pytest.raises(MetricError, match=r"'eval_loss' is missing or NaN for every active run at rung 0 \(chunk 1\)"):
        SuccessiveHalving().on_boundary(view({"a": math.nan, "b": None}, 1))
    with pytest.raises(
        MetricError, match="metric 'los' was not logged by any run at chunk 1 of a .*did you mean 'loss'"
    ):
        DivergenceGuard(metric="los").on_boundary(view({"a": 4.0}, 1, metric="loss"))

    # Nothing of its kind logged yet (a logging_steps longer than a chunk): wait, then judge the rung.
    policy = SuccessiveHalving(metric="loss")
    assert policy.on_boundary(view(values, 1)) == [] and policy.rung == 0
    assert DivergenceGuard().on_boundary(view(values, 1)) == []
    assert MedianStopping(metric="loss").on_boundary(view(values, 1)) == []
    ops = policy.on_boundary(view({"a": 3.0, "b": None, "c": 2.0, "d": 4.0}, 2, metric="loss"))
    assert [op.run for op in ops] == ["d", "b", "a"]  # rungs 0 and 1 in turn; a run without a value ranks last
    assert ops[1].reason.endswith("(rung 0, kept 2 of 4): no loss value (ranks last)")


def test_explore_perturb_keys_are_checked_against_the_trainer():
    dpo = SimpleNamespace(per_run_fields=frozenset({"learning_rate", "beta"}), args=SimpleNamespace(beta=0.1))
    dpo.args.learning_rate = 1e-3
    Explore(perturb={"beta": (0.5, 2.0)}).check_trainer(dpo)
    with pytest.raises(ValueError, match="'learing_rate' is not a field a SimpleNamespace run can override; did you"):
        Explore(perturb={"learing_rate": (2.0,)}).check_trainer(dpo)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SuccessiveHalving(eta=1), "eta must be an integer >= 2, got 1"),
        (lambda: SuccessiveHalving(min_chunks=0), "min_chunks must be an integer >= 1, got 0"),
        (lambda: SuccessiveHalving(mode="low"), "mode must be 'min' or 'max', got 'low'"),
        (lambda: MedianStopping(min_runs=1), "min_runs must be an integer >= 2, got 1"),
        (lambda: DivergenceGuard(max_ratio=0.5), "max_ratio must be a number > 1, got 0.5"),
        (lambda: Explore(top=1.5), "top must be a fraction in (0, 1) or a count >= 1, got 1.5"),
        (lambda: Explore(perturb={"learning_rate": ()}), "perturb['learning_rate'] must be a non-empty tuple"),
        (lambda: SuccessiveHalving(metric=None), "metric must be the non-empty name of a logged value (e.g. 'eval_"),
        (
            lambda: MedianStopping(metric=" "),
            "metric must be the non-empty name of a logged value (e.g. 'eval_loss'),",
        ),
        (
            lambda: DivergenceGuard(metric=5),
            "metric must be the non-empty name of a logged value (e.g. 'eval_loss'), ",
        ),
        (lambda: Explore(perturb={"max_steps": (2.0,)}), "perturb key 'max_steps' is invalid; use a training argum"),
        (lambda: Explore(perturb=["learning_rate"]), "perturb must be a dict of field -> factors, got ['learning_r"),
    ],
)
def test_bad_policy_arguments(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value)


def test_builtin_policies_are_policies():
    for policy in (SuccessiveHalving(), MedianStopping(), DivergenceGuard(), Explore()):
        assert isinstance(policy, Policy)


# ------------------------------------------------------------------------------------------------ end to end
def four_configs():
    return [
        {"name": f"lr{i}", "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "learning_rate": lr}
        for i, lr in enumerate((3e-3, 1e-3, 3e-4, 1e-4))
    ]


def trainer_with(tokenizer, chat_data, sft_args, out, policies, configs=None, eval_set=True, **kwargs):
    """96 rows, batch 8: one epoch of 12 steps in 4 chunks of 3."""
    set_seed(7)
    args = sft_args(output_dir=str(out), max_steps=12, per_device_train_batch_size=8, per_device_eval_batch_size=16)
    return RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=args,
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1].select(range(16)) if eval_set else None,
        processing_class=tokenizer,
        configs=configs or four_configs(),
        num_chunks=4,
        policies=policies,
        **kwargs,
    )


def test_successive_halving_end_to_end(tokenizer, chat_data, sft_args, tmp_path):
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, [SuccessiveHalving(eta=2)])
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert sorted(row["status"] for row in rows.values()) == ["completed", "stopped", "stopped", "stopped"]
    steps = sorted(row["global_step"] for row in rows.values())
    assert steps == [3, 3, 6, 12]  # two runs stop after chunk 1, one after chunk 2
    winner = next(name for name, row in rows.items() if row["status"] == "completed")
    stopped_at_1 = [name for name, row in rows.items() if row["global_step"] == 3]
    at_1 = {name: trainer.runs[name].state.log_history for name in rows}
    first_eval = {name: next(e["eval_loss"] for e in logs if "eval_loss" in e) for name, logs in at_1.items()}
    assert max(first_eval[n] for n in rows if n not in stopped_at_1) <= min(first_eval[n] for n in stopped_at_1)
    for name in stopped_at_1:
        assert rows[name]["reason"].startswith("stopped by SuccessiveHalving at chunk 1 (rung 0, kept 2 of 4)")
    assert rows[winner]["reason"] is None
    records = read_ledger(tmp_path / "ledger.jsonl")
    applied = [r for r in records if r["event"] == "op_applied"]
    assert len(applied) == 3 and all(r["by"] == "SuccessiveHalving" and "cut" in r["reason"] for r in applied)
    status = [r for r in records if r["event"] == "status" and r["status"] == "stopped"]
    assert all(r["by"] == "SuccessiveHalving" and r["reason"] for r in status)
    # The survivor trained exactly as it would have alone.
    alone = trainer_with(tokenizer, chat_data, sft_args, tmp_path / "alone", [], [
        c for c in four_configs() if c["name"] == winner
    ])  # fmt: skip
    alone.train()
    left = get_peft_model_state_dict(trainer.model, adapter_name=winner)
    right = get_peft_model_state_dict(alone.model, adapter_name=winner)
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_boundary_eval_false_evaluates_at_rungs_and_ends_only(tokenizer, chat_data, sft_args, tmp_path):
    policies = [SuccessiveHalving(eta=2, min_chunks=2), DivergenceGuard()]
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, policies, four_configs()[:2], boundary_eval=False)
    trainer.train()
    evals = {
        run.name: [e["step"] for e in run.state.log_history if "eval_loss" in e] for run in trainer.runs
    }  # fmt: skip
    winner = next(row["name"] for row in trainer.results() if row["status"] == "completed")
    assert evals == {name: [6, 12] if name == winner else [6] for name in evals}  # rung at chunk 2, then the end


class Broken:
    def on_boundary(self, view):
        raise RuntimeError("policy bug")


class StopEveryoneBut:
    """A user policy: stop every run except `keep` at the first boundary, with a reason."""

    def __init__(self, keep):
        self.keep = keep

    def on_boundary(self, view):
        return [Op("stop", run.name, reason="not my favourite") for run in view.active() if run.name != self.keep]


class PoisonAt(TrainerCallback):
    """Fault injection: set run `name`'s adapter to `value` after its optimizer step `step`."""

    def __init__(self, trainer, name, step, value):
        self.trainer, self.name, self.step, self.value = trainer, name, step, value

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.active_run.name == self.name and state.global_step == self.step:
            with torch.no_grad():
                for param in self.trainer.active_run.trainable:
                    param.fill_(self.value)


def test_divergence_guard_broken_and_user_policies_end_to_end(tokenizer, chat_data, sft_args, tmp_path):
    configs = four_configs()[:3]
    guard = DivergenceGuard(max_ratio=1.5)
    policies = [Broken(), guard, MedianStopping(metric="loss", min_chunks=10)]
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, policies, configs, eval_set=False)
    trainer.train()
    assert [row["status"] for row in trainer.results()] == ["completed"] * 3
    records = read_ledger(tmp_path / "ledger.jsonl")
    (error,) = [r for r in records if r["event"] == "policy_error"]
    assert error["policy"] == "Broken" and error["error"] == "RuntimeError: policy bug"
    assert list(trainer._rf_policies) == policies[1:]  # disabled, the others kept working

    # Alone, a run's NaN steps are TRL's business (the logged loss filters them) until the guard sees them.
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path / "nan", [guard], configs[2:], eval_set=False)
    trainer.add_callback(PoisonAt(trainer, "lr2", 4, math.nan))
    trainer.train()
    (row,) = trainer.results()
    assert (row["status"], row["global_step"]) == ("failed", 6)
    assert row["error"] == "failed by DivergenceGuard at step 6: grad_norm is nan"

    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path / "user", [StopEveryoneBut("lr1")], configs[:2])
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert (rows["lr0"]["status"], rows["lr0"]["reason"], rows["lr1"]["status"]) == (
        "stopped",
        "not my favourite",
        "completed",
    )
    stop = next(r for r in read_ledger(tmp_path / "user" / "ledger.jsonl") if r["event"] == "op_applied")
    assert stop["by"] == "StopEveryoneBut"


def test_a_nan_loss_fails_only_its_run(tokenizer, chat_data, sft_args, tmp_path):
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, [], four_configs()[:3], eval_set=False)
    trainer.add_callback(PoisonAt(trainer, "lr1", 4, math.nan))
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert (rows["lr1"]["status"], rows["lr1"]["error"]) == ("failed", "FloatingPointError: loss is nan at step 5")
    assert rows["lr0"]["status"] == rows["lr2"]["status"] == "completed"
    status = [r for r in read_ledger(tmp_path / "ledger.jsonl") if r["event"] == "status" and r["run"] == "lr1"]
    assert status[-1]["error"] == "FloatingPointError: loss is nan at step 5"


def test_a_misspelt_metric_stops_nothing_and_says_why_once(tokenizer, chat_data, sft_args, tmp_path):
    policies = [SuccessiveHalving(metric="eval_los"), DivergenceGuard(metric="los")]
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, policies, four_configs()[:2])
    trainer.train()
    assert [row["status"] for row in trainer.results()] == ["completed", "completed"]
    records = read_ledger(tmp_path / "ledger.jsonl")
    assert not [r for r in records if r["event"].startswith("op")]
    errors = {r["policy"]: r["error"] for r in records if r["event"] == "policy_error"}
    assert len([r for r in records if r["event"] == "policy_error"]) == 2  # once each, then disabled
    assert errors["SuccessiveHalving"].startswith(
        "MetricError: metric 'eval_los' was not logged by any run at rung 0 (chunk 1) (logged: eval_entropy, "
    )
    assert errors["SuccessiveHalving"].endswith("did you mean 'eval_loss'?")
    assert errors["DivergenceGuard"].startswith(
        "MetricError: metric 'los' was not logged by any run at chunk 1 of lr0"
    )


def test_explore_end_to_end(tokenizer, chat_data, sft_args, tmp_path):
    policy = Explore(top=1, interval=2, perturb={"learning_rate": (2.0,)})
    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, [policy], four_configs()[:3])
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    clones = [row for row in rows.values() if row["parent"]]
    assert len(clones) == 1
    (clone,) = clones
    parent = rows[clone["parent"]]
    assert clone["status"] == "completed" and clone["global_step"] == 12 - 6 == clone["max_steps"]
    assert clone["config"]["learning_rate"] == pytest.approx(2 * parent["config"]["learning_rate"])
    stopped = [row for row in rows.values() if row["status"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"].startswith("replaced by Explore at chunk 2")
    assert stopped[0]["name"] != clone["parent"]


def test_policies_are_checked_before_training(tokenizer, chat_data, sft_args, tmp_path):
    with pytest.raises(ValueError, match=r"policies\[0\] \(SuccessiveHalving\) compares 'eval_loss'"):
        trainer_with(tokenizer, chat_data, sft_args, tmp_path, [SuccessiveHalving()], eval_set=False)
    with pytest.raises(ValueError, match=r"policies\[1\] must have an on_boundary\(view\) method, got str"):
        trainer_with(tokenizer, chat_data, sft_args, tmp_path, [DivergenceGuard(), "halving"])
    with pytest.raises(ValueError, match=r"policies\[0\] \(Explore\): perturb key 'learing_rate' is not a field a "
                       r"RFSFTTrainer run can override; did you mean 'learning_rate'\?"):  # fmt: skip
        trainer_with(tokenizer, chat_data, sft_args, tmp_path, [Explore(perturb={"learing_rate": (2.0,)})])
    with pytest.raises(ValueError, match="perturb key 'beta' is not a field a RFSFTTrainer run can override$"):
        trainer_with(tokenizer, chat_data, sft_args, tmp_path, [Explore(perturb={"beta": (2.0,)})])  # a DPO field
    with pytest.raises(
        ValueError, match="'optim': its value is multiplied, but args.optim is a OptimizerNames, not a number$"
    ):
        trainer_with(tokenizer, chat_data, sft_args, tmp_path, [Explore(perturb={"optim": (2.0,)})])
