"""`RFDPOTrainer`: one config equals plain `DPOTrainer`; a run in rotation equals the run alone; per-run DPO fields are
applied exactly as `DPOTrainer` applies them and checked before any work; the reference is the shared base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from rf_callbacks import RFDPOTrainer
from rf_callbacks.preference import load_preferences


def dpo_config(output_dir, **overrides) -> DPOConfig:
    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 14,
        "max_length": 64,
        "logging_steps": 1,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 7,
    }
    values.update(overrides)
    return DPOConfig(**values)


@pytest.fixture(scope="module")
def prefs():
    """48 conversational preference pairs for training (12 steps per epoch at batch 4) and 8 for evaluation."""
    data = load_preferences(conversational=True)
    return data.select(range(48)), data.select(range(48, 56))


def adapter_weights(model, name: str) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model, adapter_name=name).items()}


def max_abs_diff(left, right) -> float:
    assert left.keys() == right.keys()
    return max((left[key] - right[key]).abs().max().item() for key in left)


def logged(log_history, key: str = "loss") -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def lora(r: int = 4, targets=("q_proj", "v_proj"), dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets))


def plain_dpo(make_model, tokenizer, train, args, peft_config, eval_dataset=None):
    set_seed(args.seed)
    trainer = DPOTrainer(
        model=make_model(),
        args=args,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
    )
    trainer.train()
    return trainer


def rf_dpo(make_model, tokenizer, train, args, configs, num_chunks, **kwargs):
    set_seed(args.seed)
    trainer = RFDPOTrainer(
        model=make_model(), args=args, train_dataset=train, processing_class=tokenizer, configs=configs,
        num_chunks=num_chunks, **kwargs,
    )  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize(("sampling", "dropout"), [("sequential", 0.0), ("random", 0.1)])
def test_one_config_equals_plain_dpo_trainer(make_model, tokenizer, prefs, tmp_path, sampling, dropout):
    train, _ = prefs
    # 14 steps cross the epoch boundary at step 12 (new shuffle with random sampling).
    plain = plain_dpo(
        make_model,
        tokenizer,
        train,
        dpo_config(tmp_path / "plain", train_sampling_strategy=sampling),
        lora(dropout=dropout),
    )
    assert list(plain.model.peft_config) == ["default"]
    ours = rf_dpo(
        make_model, tokenizer, train, dpo_config(tmp_path / "ours", train_sampling_strategy=sampling),
        [{"name": "a", "peft_config": lora(dropout=dropout)}], num_chunks=4,
    )  # fmt: skip
    assert list(ours.model.peft_config) == ["a"]  # no frozen "ref" adapter copy
    assert ours.ref_model is None
    diff = max_abs_diff(adapter_weights(plain.model, "default"), adapter_weights(ours.model, "a"))
    assert diff <= 1e-6, diff
    history = ours.runs["a"].state.log_history
    assert logged(history) == logged(plain.state.log_history)
    assert logged(history, "rewards/margins") == logged(plain.state.log_history, "rewards/margins")
    assert ours.runs["a"].global_step == plain.state.global_step == 14


def rotation_configs() -> list[dict]:
    return [
        {"name": "a", "peft_config": lora()},
        {
            "name": "b",
            "peft_config": lora(8, ("q_proj", "k_proj", "v_proj", "o_proj")),
            "beta": 0.5,
            "loss_type": ["sigmoid", "sft"],
            "loss_weights": [1.0, 0.5],
            "learning_rate": 5e-4,
            "per_device_train_batch_size": 2,
        },
        {
            "name": "c",
            "peft_config": lora(2, ("k_proj", "o_proj")),
            "beta": 0.2,
            "loss_type": "robust",
            "label_smoothing": 0.1,
            "max_length": 32,
            "lr_scheduler_type": "cosine",
            "gradient_accumulation_steps": 2,
        },
    ]


def test_dpo_run_in_rotation_equals_run_alone_and_plain_trl(make_model, tokenizer, prefs, tmp_path):
    train, _ = prefs
    alone = rf_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "alone"), rotation_configs()[:1], num_chunks=1)
    mixed = rf_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "mixed"), rotation_configs(), num_chunks=3)
    assert [row["status"] for row in mixed.results()] == ["completed"] * 3
    assert sorted(mixed.model.peft_config) == ["a", "b", "c"]
    assert max_abs_diff(adapter_weights(alone.model, "a"), adapter_weights(mixed.model, "a")) == 0.0
    assert logged(mixed.runs["a"].state.log_history) == logged(alone.runs["a"].state.log_history)

    # Run "b" (its own beta, loss mix, batch size and learning rate) trained among the others equals plain DPOTrainer
    # given those values in its DPOConfig: the per-run fields reach the loss exactly as TRL's own arguments do.
    b = rotation_configs()[1]
    fields = {key: value for key, value in b.items() if key not in ("name", "peft_config")}
    plain_b = plain_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "plain-b", **fields), b["peft_config"])
    assert max_abs_diff(adapter_weights(plain_b.model, "default"), adapter_weights(mixed.model, "b")) <= 1e-6
    assert logged(mixed.runs["b"].state.log_history) == logged(plain_b.state.log_history)

    # Run "c" (max_length 32) trains on its own copy of the data, truncated by its own collator.
    c = rotation_configs()[2]
    fields = {key: value for key, value in c.items() if key not in ("name", "peft_config")}
    plain_c = plain_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "plain-c", **fields), c["peft_config"])
    assert max_abs_diff(adapter_weights(plain_c.model, "default"), adapter_weights(mixed.model, "c")) <= 1e-6
    assert logged(mixed.runs["c"].state.log_history) == logged(plain_c.state.log_history)


@pytest.mark.parametrize("equal_batches", [False, True], ids=["looped", "stacked"])
def test_fused_dpo_matches_rotation(make_model, tokenizer, prefs, tmp_path, equal_batches):
    """`fused=True`: the runs' policy passes share one forward and backward over their concatenated [chosen; rejected]
    micro-batches; with their own betas, loss mixes, label smoothing, `max_length`s, batch sizes and gradient
    accumulation they end within 1e-4 of rotation, with the same logged losses and reward margins (to 1e-4: a margin is
    a difference of log-probability sums of ~-100, computed from differently shaped matrices)."""
    configs = rotation_configs()
    if equal_batches:  # every micro-batch 4 rows x 2: the LoRA layers take the stacked (`bmm`) path
        configs[1].pop("per_device_train_batch_size")
    train, _ = prefs
    rotation = rf_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "rot"), copy.deepcopy(configs), num_chunks=3)
    fused = rf_dpo(
        make_model, tokenizer, train, dpo_config(tmp_path / "fused"), copy.deepcopy(configs), num_chunks=3, fused=True
    )
    assert [row["status"] for row in fused.results()] == ["completed"] * 3
    for name in "abc":
        diff = max_abs_diff(adapter_weights(rotation.model, name), adapter_weights(fused.model, name))
        assert diff < 1e-4, (name, diff)
        assert (
            adapter_weights(fused.model, name)[next(k for k in adapter_weights(fused.model, name) if "lora_B" in k)]
            .abs()
            .max()
            > 0
        )
        for key in ("loss", "rewards/margins"):
            expected, got = (
                logged(rotation.runs[name].state.log_history, key),
                logged(fused.runs[name].state.log_history, key),
            )
            assert [step for step, _ in got] == [step for step, _ in expected]
            assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-4, abs=1e-4)
    ledger = [json.loads(line) for line in (tmp_path / "fused" / "ledger.jsonl").read_text().splitlines()]
    # Trained together, round by round (c accumulates 2 micro-batches per step, so it logs every second round)
    assert [e["run"] for e in ledger if "loss" in e][:5] == ["a", "b", "a", "b", "c"]


def test_results_and_metrics_are_per_run(make_model, tokenizer, prefs, tmp_path):
    train, val = prefs
    configs = [{"name": "lo", "peft_config": lora(), "beta": 0.05}, {"name": "hi", "peft_config": lora(), "beta": 1.0}]
    args = dpo_config(tmp_path / "out", max_steps=8, eval_strategy="no")
    set_seed(args.seed)
    trainer = RFDPOTrainer(
        model=make_model(), args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
        configs=configs, num_chunks=2,
    )  # fmt: skip
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    for row in rows.values():
        for key in ("rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins"):
            assert isinstance(row[key], float), (row["name"], key)
    # Same adapter init and data; the rewards are beta x log-ratio, 0 at step 1. Adam moves both adapters by about the
    # same amount in step 1, so at step 2 "hi" logs about 20x the rewards of "lo": metrics are never mixed across runs.
    lo = logged(trainer.runs["lo"].state.log_history, "rewards/chosen")
    hi = logged(trainer.runs["hi"].state.log_history, "rewards/chosen")
    assert len(lo) == len(hi) == 8
    assert lo[0] == hi[0] == (1, 0.0)
    assert abs(hi[1][1] / lo[1][1] / 20.0 - 1.0) < 0.05
    assert trainer._metrics["train"] == {}  # flushed into the active run's logs


def test_explicit_ref_model_is_shared(make_model, tokenizer, prefs, tmp_path):
    train, _ = prefs
    configs = [{"name": "a", "peft_config": lora()}, {"name": "b", "peft_config": lora(8), "beta": 0.3}]
    base_ref = rf_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "base", max_steps=6), configs, num_chunks=2)
    given = rf_dpo(
        make_model, tokenizer, train, dpo_config(tmp_path / "given", max_steps=6), configs, num_chunks=2,
        ref_model=make_model(),  # the same weights as the base: the same reference
    )  # fmt: skip
    assert given.ref_model is not None and sorted(given.model.peft_config) == ["a", "b"]
    for name in ("a", "b"):
        assert max_abs_diff(adapter_weights(base_ref.model, name), adapter_weights(given.model, name)) <= 1e-6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"beta": -0.1}, "beta=-0.1 is invalid; it must be a finite number > 0"),
        ({"beta": "high"}, "beta must be a number"),
        ({"loss_type": "sigmod"}, "loss_type='sigmod' is invalid; unknown 'sigmod'"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": "exo_pair"}, "the 'exo_pair' loss needs it > 0"),
        ({"label_smoothing": 1.5}, "label_smoothing=1.5 is invalid"),
        ({"f_divergence_type": "forward_kl", "loss_type": "bco_pair"}, "supports only 'reverse_kl'"),
        ({"precompute_ref_log_probs": True}, "cannot differ per run in one process (the reference log-probs"),
        ({"use_weighting": True}, "cannot differ per run in one process"),
        ({"bta": 0.2}, "unknown field 'bta'; did you mean 'beta'?"),
    ],
)
def test_bad_per_run_dpo_field_is_refused(make_model, tokenizer, prefs, tmp_path, override, message):
    configs = [{"name": "ok", "peft_config": lora()}, {"name": "bad", "peft_config": lora(), **override}]
    with pytest.raises(ValueError, match="configs\\[1\\] \\('bad'\\)") as error:
        RFDPOTrainer(
            model=make_model(), args=dpo_config(tmp_path / "out"), train_dataset=prefs[0], processing_class=tokenizer,
            configs=configs,
        )  # fmt: skip
    assert message in str(error.value)


def test_data_set_without_preference_columns_is_refused(make_model, tokenizer, chat_data, tmp_path):
    with pytest.raises(ValueError, match="DPO needs chosen\\+rejected"):
        RFDPOTrainer(
            model=make_model(), args=dpo_config(tmp_path / "out"), train_dataset=chat_data[0],
            processing_class=tokenizer, configs=[{"peft_config": lora()}],
        )  # fmt: skip


def test_shared_precomputed_reference_log_probs(make_model, tokenizer, prefs, tmp_path):
    """`precompute_ref_log_probs=True` (shared): computed once per data copy from the base, used by every run."""
    train, _ = prefs
    configs = [
        {"name": "a", "peft_config": lora()},
        {"name": "b", "peft_config": lora(8), "beta": 0.3, "max_length": 32},
    ]
    live = rf_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "live", max_steps=6), configs, num_chunks=2)
    args = dpo_config(tmp_path / "pre", max_steps=6, precompute_ref_log_probs=True)
    pre = rf_dpo(make_model, tokenizer, train, args, configs, num_chunks=2)
    for name in ("a", "b"):
        assert max_abs_diff(adapter_weights(live.model, name), adapter_weights(pre.model, name)) <= 1e-5


def test_run_named_default_gets_no_ref_copy_and_ref_is_reserved(make_model, tokenizer, prefs, tmp_path):
    train, _ = prefs
    alone = rf_dpo(
        make_model,
        tokenizer,
        train,
        dpo_config(tmp_path / "a", max_steps=4),
        [{"name": "x", "peft_config": lora()}],
        2,
    )
    configs = [{"name": "default", "peft_config": lora()}, {"name": "b", "peft_config": lora(8), "beta": 0.5}]
    trainer = rf_dpo(make_model, tokenizer, train, dpo_config(tmp_path / "d", max_steps=4), configs, num_chunks=2)
    assert sorted(trainer.model.peft_config) == ["b", "default"]  # TRL's "ref" copy of "default" is removed
    assert max_abs_diff(adapter_weights(alone.model, "x"), adapter_weights(trainer.model, "default")) == 0.0
    with pytest.raises(ValueError, match="name='ref' is reserved"):
        RFDPOTrainer(
            model=make_model(), args=dpo_config(tmp_path / "r"), train_dataset=train, processing_class=tokenizer,
            configs=[{"name": "ref", "peft_config": lora()}],
        )  # fmt: skip


def test_policies_steer_dpo_runs(make_model, tokenizer, prefs, tmp_path):
    from rf_callbacks.policies import SuccessiveHalving

    configs = [{"name": "fast", "peft_config": lora(), "learning_rate": 1e-2}, {"name": "slow", "peft_config": lora(),
               "learning_rate": 1e-6}]  # fmt: skip
    args = dpo_config(tmp_path, max_steps=12)
    trainer = rf_dpo(make_model, tokenizer, prefs[0], args, configs, 4, policies=[SuccessiveHalving(metric="loss")])
    rows = {row["name"]: row for row in trainer.results()}
    stopped = [row for row in rows.values() if row["status"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["global_step"] == 3
    assert stopped[0]["reason"].startswith("stopped by SuccessiveHalving at chunk 1 (rung 0, kept 1 of 2): loss")
    assert sum(row["status"] == "completed" for row in rows.values()) == 1


def test_run_whose_data_truncation_leaves_no_pair_is_refused(make_model, tokenizer, prefs, tmp_path):
    """TRL drops pairs that `max_length` truncates to nothing: a run left without a batch is refused up front (it used
    to loop forever), and a clone in that state fails alone."""
    configs = [{"name": "ok", "peft_config": lora()}, {"name": "tiny", "peft_config": lora(), "max_length": 4}]
    with pytest.raises(ValueError, match="run 'tiny' has no training batch: its training set has 0 rows"):
        RFDPOTrainer(
            model=make_model(), args=dpo_config(tmp_path / "out"), train_dataset=prefs[0], processing_class=tokenizer,
            configs=configs,
        )  # fmt: skip

    args = dpo_config(tmp_path / "clone", max_steps=4)
    set_seed(args.seed)
    trainer = RFDPOTrainer(
        model=make_model(), args=args, train_dataset=prefs[0], processing_class=tokenizer, configs=configs[:1],
        num_chunks=2,
    )  # fmt: skip
    trainer.clone("ok", {"max_length": 4}, name="tiny")
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["ok"]["status"] == "completed" and rows["tiny"]["status"] == "failed"
    assert "has no training batch" in rows["tiny"]["error"]
