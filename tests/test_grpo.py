"""`RFGRPOTrainer`: one config equals plain `GRPOTrainer`; a run in rotation (chunk boundaries inside its generation
cycles) equals the run alone; per-run GRPO fields are applied exactly as `GRPOTrainer` applies them and checked before
any work; metrics stay per run."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model_state_dict
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer

from rf_callbacks import RFGRPOTrainer
from rf_callbacks.demo import load_instructions
from rf_callbacks.ops import OpError


def correct(completions, answer, **kwargs):
    return [1.0 if expected in completion[0]["content"] else 0.0 for completion, expected in zip(completions, answer)]


def brevity(completions, **kwargs):
    return [-len(completion[0]["content"]) / 100 for completion in completions]


REWARDS = [correct, brevity]


@pytest.fixture(scope="module")
def prompts():
    """8 arithmetic-style prompts with their numeric answer: with batch 4, 4 generations and steps_per_generation 2,
    an epoch is 4 groups of 2 prompts, each group used for 2 x num_iterations micro-steps."""
    rows = [row for row in load_instructions() if re.search(r"\d", row["response"])][:8]
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row["instruction"]}],
                "answer": re.findall(r"\d+", row["response"])[-1],
            }
            for row in rows
        ]
    )


def grpo_config(output_dir, **overrides) -> GRPOConfig:
    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 10,
        "logging_steps": 1,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 7,
        "num_generations": 4,
        "max_completion_length": 12,
        "steps_per_generation": 2,
        "num_iterations": 2,
        "beta": 0.04,
    }
    values.update(overrides)
    return GRPOConfig(**values)


def lora(r: int = 4, targets=("q_proj", "v_proj")) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))


def adapter_weights(model, name: str) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model, adapter_name=name).items()}


def max_abs_diff(left, right) -> float:
    assert left.keys() == right.keys()
    return max((left[key] - right[key]).abs().max().item() for key in left)


def logged(log_history, key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


LOGGED = (
    "loss",
    "reward",
    "reward_std",
    "kl",
    "rewards/correct/mean",
    "rewards/brevity/mean",
    "completions/mean_length",
)


def plain_grpo(make_model, tokenizer, train, args, peft_config):
    set_seed(args.seed)
    trainer = GRPOTrainer(
        model=make_model(), reward_funcs=REWARDS, args=args, train_dataset=train, processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
    )  # fmt: skip
    trainer.train()
    return trainer


def rf_grpo(make_model, tokenizer, train, args, configs, num_chunks, **kwargs):
    set_seed(args.seed)
    trainer = RFGRPOTrainer(
        model=make_model(), reward_funcs=REWARDS, args=args, train_dataset=train, processing_class=tokenizer,
        configs=configs, num_chunks=num_chunks, **kwargs,
    )  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_config_equals_plain_grpo_trainer(make_model, tokenizer, prompts, tmp_path, shuffle):
    # 16 optimizer steps per epoch: 20 steps cross into the second epoch (the sampler's second permutation).
    plain_args = grpo_config(tmp_path / "plain", max_steps=20, shuffle_dataset=shuffle)
    plain = plain_grpo(make_model, tokenizer, prompts, plain_args, lora())
    ours_args = grpo_config(tmp_path / "ours", max_steps=20, shuffle_dataset=shuffle)
    ours = rf_grpo(make_model, tokenizer, prompts, ours_args, [{"name": "a", "peft_config": lora()}], num_chunks=4)
    assert list(ours.model.peft_config) == ["a"]  # no frozen "ref" adapter copy: the reference is the base
    diff = max_abs_diff(adapter_weights(plain.model, "default"), adapter_weights(ours.model, "a"))
    assert diff <= 1e-6, diff
    for key in LOGGED:
        assert logged(ours.runs["a"].state.log_history, key) == logged(plain.state.log_history, key), key
    assert ours.runs["a"].global_step == plain.state.global_step == 20


def rotation_configs() -> list[dict]:
    return [
        {"name": "a", "peft_config": lora()},
        {
            "name": "b",
            "peft_config": lora(8, ("q_proj", "k_proj", "v_proj", "o_proj")),
            "temperature": 0.7,
            "beta": 0.0,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_completion_length": 8,
            "num_iterations": 1,
            "reward_weights": [1.0, 0.5],
            "scale_rewards": False,
            "loss_type": "dr_grpo",
            "learning_rate": 5e-4,
        },
        {
            "name": "c",
            "peft_config": lora(2, ("k_proj", "o_proj")),
            "top_p": 0.9,
            "epsilon": 0.1,
            "steps_per_generation": 4,
            "num_iterations": 1,
            "seed": 11,
        },
    ]


def test_grpo_run_in_rotation_equals_run_alone_and_plain_trl(make_model, tokenizer, prompts, tmp_path):
    alone = rf_grpo(make_model, tokenizer, prompts, grpo_config(tmp_path / "alone"), rotation_configs()[:1], 1)
    # 5 chunks of a 16-step epoch: boundaries at steps 3, 6, 9, inside run "a"'s 4-step generation cycles, so its
    # buffered generations are parked with it while the others train.
    mixed = rf_grpo(make_model, tokenizer, prompts, grpo_config(tmp_path / "mixed"), rotation_configs(), num_chunks=5)
    assert [row["status"] for row in mixed.results()] == ["completed"] * 3
    assert max_abs_diff(adapter_weights(alone.model, "a"), adapter_weights(mixed.model, "a")) == 0.0
    for key in LOGGED:
        assert logged(mixed.runs["a"].state.log_history, key) == logged(alone.runs["a"].state.log_history, key), key

    # Run "b" trained among the others equals plain GRPOTrainer given its values: the per-run fields reach
    # generation, rewards and loss exactly as TRL's own arguments do.
    b = rotation_configs()[1]
    fields = {key: value for key, value in b.items() if key not in ("name", "peft_config")}
    plain_b = plain_grpo(make_model, tokenizer, prompts, grpo_config(tmp_path / "plain-b", **fields), b["peft_config"])
    assert max_abs_diff(adapter_weights(plain_b.model, "default"), adapter_weights(mixed.model, "b")) <= 1e-6
    for key in LOGGED:
        assert logged(mixed.runs["b"].state.log_history, key) == logged(plain_b.state.log_history, key), key

    rows = {row["name"]: row for row in mixed.results()}
    for row in rows.values():
        for key in ("reward", "reward_std", "rewards/correct/mean", "rewards/brevity/mean", "completions/mean_length"):
            assert isinstance(row[key], float), (row["name"], key)
    assert "kl" in rows["a"] and "kl" not in rows["b"]  # beta=0 logs no KL: never mixed in from another run
    assert max(value for _, value in logged(mixed.runs["b"].state.log_history, "completions/max_length")) <= 8


def test_negative_control_unparked_generation_buffer_breaks_rotation(
    make_model, tokenizer, prompts, tmp_path, monkeypatch
):
    """Without parking `_step` and `_buffered_inputs`, run "a" resumes mid-cycle with another run's generations."""
    alone = rf_grpo(make_model, tokenizer, prompts, grpo_config(tmp_path / "alone"), rotation_configs()[:1], 1)
    shared = tuple(name for name in RFGRPOTrainer.run_attributes if name not in ("_step", "_buffered_inputs"))
    monkeypatch.setattr(RFGRPOTrainer, "run_attributes", shared)
    broken = rf_grpo(make_model, tokenizer, prompts, grpo_config(tmp_path / "broken"), rotation_configs(), 5)
    assert max_abs_diff(adapter_weights(alone.model, "a"), adapter_weights(broken.model, "a")) > 1e-4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"num_generations": 3}, "must be divisible by"),
        ({"num_generations": 1}, "GRPO requires at least 2 generations per prompt"),
        ({"temperature": 0.0}, "temperature=0.0 is invalid"),
        ({"reward_weights": [1.0]}, "give one finite number per reward function (2)"),
        ({"loss_type": "ppo"}, "loss_type='ppo' is invalid"),
        ({"generation_batch_size": 6}, "generation_batch_size=6 is invalid"),
        ({"use_vllm": True}, "cannot differ per run in one process (the generation backend"),
        ({"temprature": 0.5}, "unknown field 'temprature'; did you mean 'temperature'?"),
        ({"top_k": -1}, "top_k=-1 is invalid"),
        ({"importance_sampling_level": "word"}, "importance_sampling_level='word' is invalid"),
        ({"completion_only_loss": True}, "'completion_only_loss' is a field of SFTConfig, not of GRPOConfig"),
    ],
)
def test_bad_per_run_grpo_field_is_refused(make_model, tokenizer, prompts, tmp_path, override, message):
    configs = [{"name": "ok", "peft_config": lora()}, {"name": "bad", "peft_config": lora(), **override}]
    with pytest.raises(ValueError, match="configs\\[1\\] \\('bad'\\)") as error:
        RFGRPOTrainer(
            model=make_model(), reward_funcs=REWARDS, args=grpo_config(tmp_path / "out"), train_dataset=prompts,
            processing_class=tokenizer, configs=configs,
        )  # fmt: skip
    assert message in str(error.value)


def test_clone_of_a_grpo_run_gets_its_own_generation_settings(make_model, tokenizer, prompts, tmp_path):
    args = grpo_config(tmp_path / "out", max_steps=6)
    set_seed(args.seed)
    trainer = RFGRPOTrainer(
        model=make_model(), reward_funcs=REWARDS, args=args, train_dataset=prompts, processing_class=tokenizer,
        configs=[{"name": "a", "peft_config": lora()}], num_chunks=2,
    )  # fmt: skip
    trainer.clone("a", {"num_generations": 2, "temperature": 0.5}, name="a-g2")
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert rows["a-g2"]["status"] == "completed" and isinstance(rows["a-g2"]["reward"], float)
    clone = trainer.runs["a-g2"]
    assert clone.args.num_generations == 2 and clone.args.generation_batch_size == 8


def test_interrupted_grpo_experiment_resumes_bit_for_bit(make_model, tokenizer, prompts, tmp_path, monkeypatch):
    """Checkpoints at every boundary; Ctrl-C while run "c" trains its second chunk, when the last checkpoint holds run
    "a" at step 6, in the middle of a 4-step generation cycle: the resume must continue from a's buffered generations,
    not generate afresh. Every adapter and every logged value then equals the uninterrupted run's."""
    from transformers import TrainerCallback

    from rf_callbacks.checkpoint import latest_checkpoint
    from rf_callbacks.ledger import read_ledger

    def args(out):
        return grpo_config(out, save_strategy="steps", save_steps=10000)

    def build(out):
        set_seed(7)
        return RFGRPOTrainer(
            model=make_model(), reward_funcs=REWARDS, args=args(out), train_dataset=prompts,
            processing_class=tokenizer, configs=rotation_configs(), num_chunks=5, control_socket=False,
        )  # fmt: skip

    def values(out):  # every logged value but timings
        keys = [*LOGGED, "grad_norm", "learning_rate", "entropy", "clip_ratio/region_mean"]
        records = read_ledger(out / "ledger.jsonl")
        return sorted((r["run"], r["step"], k, r[k]) for r in records if r["event"] == "log" for k in keys if k in r)

    reference = build(tmp_path / "reference")
    reference.train()
    interrupted = tmp_path / "interrupted"
    trainer = build(interrupted)

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer.active_run.name == "c" and state.global_step == 2:
                raise KeyboardInterrupt

    trainer.add_callback(CtrlC())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    last = latest_checkpoint(interrupted)
    state = json.loads((last / "runs" / "a" / "state.json").read_text())["extra"]
    assert state["_step"] == 6 and len(state["_buffered_inputs"]) == 2  # a is mid-cycle there

    resumed = build(interrupted)
    resumed.train(resume_from_checkpoint=True)
    assert [row["status"] for row in resumed.results()] == ["completed"] * 3
    for name in ("a", "b", "c"):
        assert max_abs_diff(adapter_weights(reference.model, name), adapter_weights(resumed.model, name)) == 0.0, name
    assert values(interrupted) == values(tmp_path / "reference")

    # Negative control: a resume that drops the buffered generations regenerates them, and run "a" drifts.
    broken = tmp_path / "broken"
    trainer = build(broken)
    trainer.add_callback(CtrlC())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    load = RFGRPOTrainer._load_extra_state

    def forgetful(self, extra, tensors):
        load(self, {**extra, "_buffered_inputs": None} if "_step" in extra else extra, tensors)

    monkeypatch.setattr(RFGRPOTrainer, "_load_extra_state", forgetful)
    again = build(broken)
    again.train(resume_from_checkpoint=True)
    assert max_abs_diff(adapter_weights(reference.model, "a"), adapter_weights(again.model, "a")) > 1e-4


def test_eval_generations_are_checked_when_boundaries_evaluate(make_model, tokenizer, prompts, tmp_path):
    """`GRPOConfig` checks the eval batch only with an eval strategy; chunk boundaries evaluate without one."""
    configs = [
        {"name": "ok", "peft_config": lora()},
        {"name": "bad", "peft_config": lora(), "num_generations_eval": 3},
    ]
    args = grpo_config(tmp_path / "out", per_device_eval_batch_size=8)
    build = dict(
        model=make_model(), reward_funcs=REWARDS, args=args, train_dataset=prompts, processing_class=tokenizer
    )
    with pytest.raises(ValueError, match=r"configs\[1\] \('bad'\): num_generations_eval=3 is invalid; the run is"):
        RFGRPOTrainer(**build, eval_dataset=prompts.select(range(8)), configs=configs)
    trainer = RFGRPOTrainer(**build, eval_dataset=prompts.select(range(8)), configs=configs[:1])
    with pytest.raises(OpError, match=r"clone \('ok-clone-1'\): temperature=0.0 is invalid"):
        trainer.clone("ok", {"temperature": 0.0})
