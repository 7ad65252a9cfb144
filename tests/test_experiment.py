"""`Experiment.run_fit` end to end on the embedded tiny model: the RapidFire AI script, groups and bases, generation
metrics, and the errors raised before any model is created."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from peft import PeftModel

from rf_callbacks import Experiment
from rf_callbacks.automl import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_callbacks.demo import build_tiny_model, build_tokenizer, load_instructions
from rf_callbacks.ledger import read_ledger

LORA = {"target_modules": ["q_proj", "v_proj"]}


def to_prompt_completion(row):
    return {
        "prompt": [{"role": "user", "content": row["instruction"]}],
        "completion": [{"role": "assistant", "content": row["response"]}],
    }


@pytest.fixture(scope="module")
def rows():
    """Raw instruction rows from the bundled data: 64 to train on, 8 to evaluate on."""
    data = load_instructions()
    return data.select(range(64)), data.select(range(64, 72))


class ModelFactory:
    """A `create_model_fn` that builds the tiny model (seed from the model name) and remembers what it was asked."""

    def __init__(self):
        self.calls, self.models = [], {}

    def __call__(self, model_config):
        self.calls.append(model_config)
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, seed=len(model_config["model_name"]))
        self.models[model_config["model_name"]] = model
        return model, tokenizer


def sft(**values):
    return RFSFTConfig(**{"max_steps": 8, "per_device_train_batch_size": 8, "disable_tqdm": True, **values})


def test_rapidfire_script_end_to_end(rows, tmp_path):
    train_dataset, eval_dataset = rows
    fp16 = torch.cuda.is_available()
    configs = List(
        [
            RFModelConfig(
                model_name="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                peft_config=RFLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                training_args=sft(learning_rate=1e-3, fp16=fp16),
                formatting_func=to_prompt_completion,
            ),
            RFModelConfig(
                model_name="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                peft_config=RFLoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"]),
                training_args=sft(learning_rate=1e-4),
                formatting_func=to_prompt_completion,
            ),
        ]
    )
    create_model = ModelFactory()
    experiment = Experiment(experiment_name="sft-comparison", experiment_path=tmp_path)
    experiment.run_fit(
        RFGridSearch(configs=configs, trainer_type="SFT"),
        create_model,
        train_dataset,
        eval_dataset=eval_dataset,
        num_chunks=4,
        seed=42,
    )
    results = experiment.get_results()
    assert isinstance(results, pd.DataFrame) and set(results["run_id"]) == {1, 2}
    assert {"step", "eval_loss", "config.r", "config.learning_rate", "config.model_name"} <= set(results.columns)
    assert sorted(results[results.run_id == 1]["step"]) == [2, 4, 6, 8]  # an evaluation at each chunk boundary
    assert results.groupby("run_id")["config.r"].first().to_dict() == {1: 8, 2: 32}

    info = experiment.get_runs_info().set_index("run_id")
    assert list(info.index) == [1, 2] and set(info["status"]) == {"completed"}
    assert list(info["chunks_done"]) == [4, 4] and list(info["global_step"]) == [8, 8]
    assert info.loc[2, "config"]["learning_rate"] == 1e-4 and info.loc[1, "run_name"] == "run-1"
    assert len(create_model.calls) == 1
    assert create_model.calls[0]["model_name"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    group = tmp_path / "sft-comparison" / "group-1"
    for run_id in (1, 2):
        adapter = group / "runs" / f"run-{run_id}"
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
        assert not list(adapter.glob("checkpoint-*"))  # save_strategy defaults to "no", as in RapidFire AI
    base = build_tiny_model(build_tokenizer(), seed=len("TinyLlama/TinyLlama-1.1B-Chat-v1.0"))
    loaded = PeftModel.from_pretrained(base, str(group / "runs" / "run-2"))
    assert loaded.peft_config["default"].r == 32
    assert json.loads((tmp_path / "sft-comparison" / "runs.json").read_text())["runs"][1]["status"] == "completed"
    experiment.end()
    with pytest.raises(RuntimeError, match="ended"):
        experiment.run_fit(configs, create_model, train_dataset)
    assert Experiment("sft-comparison", experiment_path=tmp_path).experiment_name == "sft-comparison_2"


def test_groups_load_each_base_once_and_keep_chunk_order(rows, tmp_path):
    train_dataset, eval_dataset = rows
    # logging_nan_inf_filter cannot differ inside one trainer, so base "tiny-a" needs two groups; "tiny-b" one more.
    configs = [
        RFModelConfig(
            model_name="tiny-a",
            peft_config=RFLoraConfig(r=4, **LORA),
            training_args=sft(learning_rate=List([1e-3, 2e-3]), logging_nan_inf_filter=List([True, False])),
            formatting_func=to_prompt_completion,
        ),
        RFModelConfig(
            model_name="tiny-b",
            peft_config=RFLoraConfig(r=List([2, 4]), **LORA),
            training_args=sft(max_steps=4),
            formatting_func=to_prompt_completion,
        ),
    ]
    create_model = ModelFactory()
    experiment = Experiment("groups", experiment_path=tmp_path)
    experiment.run_fit(configs, create_model, train_dataset, eval_dataset, num_shards=2)
    assert [call["model_name"] for call in create_model.calls] == ["tiny-a", "tiny-b"]
    info = experiment.get_runs_info().set_index("run_id")
    assert set(info["status"]) == {"completed"}
    assert info["group"].to_dict() == {
        1: "group-1",
        3: "group-1",
        2: "group-2",
        4: "group-2",
        5: "group-3",
        6: "group-3",
    }
    assert info.loc[5, "max_steps"] == 4 and info.loc[1, "chunks_done"] == 2
    # Within a group, every run finishes chunk c before any run starts chunk c + 1.
    evals = [e["run"] for e in read_ledger(tmp_path / "groups" / "group-1" / "ledger.jsonl") if "eval_loss" in e]
    assert evals == ["run-1", "run-3", "run-1", "run-3"]
    # Group 2 reused base "tiny-a" after group 1: its adapters were removed and its weights never changed.
    base = create_model.models["tiny-a"]
    assert not any("lora" in name for name, _ in base.named_modules())
    fresh = build_tiny_model(build_tokenizer(), seed=len("tiny-a"))
    assert all(torch.equal(p, q) for p, q in zip(base.state_dict().values(), fresh.state_dict().values()))
    results = experiment.get_results()
    assert set(results["run_id"]) == {1, 2, 3, 4, 5, 6}
    experiment.end()


def test_compute_metrics_gets_decoded_generations(rows, tmp_path):
    train_dataset, eval_dataset = rows
    seen = []

    def exact_match(eval_preds):
        predictions, references = eval_preds
        seen.append((list(predictions), list(references)))
        return {"exact_match": sum(p == r for p, r in zip(predictions, references)) / len(references)}

    common = {
        "model_name": "tiny",
        "peft_config": RFLoraConfig(r=4, lora_dropout=0.1, **LORA),
        "training_args": sft(max_steps=4, logging_steps=1),
        "formatting_func": to_prompt_completion,
    }
    configs = [
        RFModelConfig(
            **common, compute_metrics=exact_match, generation_config={"max_new_tokens": 4, "do_sample": True}
        ),
        RFModelConfig(**common),  # the same run without generation: generating must not change its training
    ]
    experiment = Experiment("generation", experiment_path=tmp_path)
    experiment.run_fit(configs, ModelFactory(), train_dataset, eval_dataset.select(range(4)), num_chunks=4)
    results = experiment.get_results()
    with_metric = results[results.run_id == 1].dropna(subset=["eval_exact_match"])
    assert list(with_metric["step"]) == [2, 4] and with_metric["eval_exact_match"].between(0, 1).all()
    assert "eval_exact_match" not in results[results.run_id == 2].dropna(axis=1, how="all").columns
    predictions, references = seen[0]
    assert len(seen) == 2 and len(predictions) == 4 and all(isinstance(p, str) for p in predictions)
    assert references == [row["response"].strip() for row in eval_dataset.select(range(4))]
    losses = results.pivot_table(index="step", columns="run_id", values="loss")
    assert losses[1].tolist() == losses[2].tolist() and len(losses) == 4
    # A second run_fit continues the run ids and the group folders.
    experiment.run_fit(RFModelConfig(**common), ModelFactory(), train_dataset, num_chunks=4)
    info = experiment.get_runs_info()
    assert list(info["run_id"]) == [1, 2, 3] and list(info["group"]) == ["group-1", "group-1", "group-2"]
    assert set(experiment.get_results()["run_id"]) == {1, 2, 3}
    experiment.end()


def test_errors_come_before_any_model_is_created(rows, tmp_path):
    train_dataset, _ = rows
    create_model = ModelFactory()
    experiment = Experiment("errors", experiment_path=tmp_path)

    def bad_format(row):
        return (
            {"question": row["instruction"]}
            if row["instruction"] == train_dataset[3]["instruction"]
            else (to_prompt_completion(row))
        )

    leaf = RFModelConfig(model_name="tiny", peft_config=RFLoraConfig(r=4, **LORA), training_args=sft())
    with pytest.raises(ValueError, match=r"row 3; SFT needs .*prompt\+completion") as error:
        experiment.run_fit(RFModelConfig(**{**vars(leaf), "formatting_func": bad_format}), create_model, train_dataset)
    assert "['question']" in str(error.value)
    with pytest.raises(ValueError, match="columns \\['instruction', 'response'\\].*formatting_func"):
        experiment.run_fit(leaf, create_model, train_dataset)
    formatted = RFModelConfig(**{**vars(leaf), "formatting_func": to_prompt_completion})
    with pytest.raises(ValueError, match="num_chunks=9 is more than run 'run-1' has optimizer steps per epoch \\(8"):
        experiment.run_fit(formatted, create_model, train_dataset, num_chunks=9)
    with pytest.raises(ValueError, match="DPO needs one of: prompt\\+chosen\\+rejected"):  # RFDPOTrainer exists now
        experiment.run_fit(
            RFGridSearch(RFModelConfig(model_name="tiny"), trainer_type="DPO"), create_model, train_dataset
        )
    with pytest.raises(ValueError, match="every leaf needs a peft_config"):
        experiment.run_fit(
            [formatted, RFModelConfig(**{**vars(formatted), "peft_config": None})], create_model, train_dataset
        )
    assert create_model.calls == [] and experiment.get_runs_info().empty and experiment.get_results().empty


def test_dpo_group_shares_one_reference_model_from_ref_model_name(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rf_callbacks.automl import RFDPOConfig
    from rf_callbacks.preference import load_preferences

    reference_dir = tmp_path / "reference"
    build_tiny_model(build_tokenizer(), seed=99).save_pretrained(reference_dir)
    loaded = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(name, *args, **kwargs):
        loaded.append(str(name))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    leaf = RFModelConfig(
        model_name="tiny",
        ref_model_name=str(reference_dir),
        peft_config=RFLoraConfig(r=4, **LORA),
        training_args=RFDPOConfig(
            max_steps=4, per_device_train_batch_size=8, beta=List([0.1, 0.5]), disable_tqdm=True
        ),
    )
    experiment = Experiment("dpo-ref", experiment_path=str(tmp_path))
    experiment.run_fit(RFGridSearch(leaf, trainer_type="DPO"), ModelFactory(), load_preferences().select(range(64)))
    info = experiment.get_runs_info()
    assert list(info["status"]) == ["completed", "completed"]
    assert loaded == [str(reference_dir)]  # one reference model for the whole group
    experiment.end()


def test_run_fit_takes_policies(rows, tmp_path):
    from rf_callbacks.policies import SuccessiveHalving

    train_dataset, eval_dataset = rows
    configs = List(
        [
            RFModelConfig(
                model_name="tiny",
                peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                training_args=sft(learning_rate=lr),
                formatting_func=to_prompt_completion,
            )
            for lr in (1e-2, 1e-6)
        ]
    )
    experiment = Experiment(experiment_name="halving", experiment_path=tmp_path)
    policies = [SuccessiveHalving(eta=2)]
    experiment.run_fit(
        configs, ModelFactory(), train_dataset, eval_dataset, num_chunks=4, policies=policies, fused=True
    )
    info = experiment.get_runs_info().set_index("run_id")
    assert sorted(info["status"]) == ["completed", "stopped"]
    ledger = [json.loads(line) for line in next(tmp_path.rglob("ledger.jsonl")).read_text().splitlines()]
    # fused: both runs start together (in rotation run-2 starts after run-1's first chunk)
    assert [(e["run"], e.get("status")) for e in ledger[:2]] == [("run-1", "running"), ("run-2", "running")]
    assert policies[0].rung == 0  # each group got its own copy; the caller's object is untouched


def test_clones_made_while_a_group_trains_get_run_ids(rows, tmp_path):
    """A clone (an IC op, a policy such as `Explore`) joins `get_runs_info()`/`get_results()` with the next run id."""
    from rf_callbacks.policies import Explore

    train_dataset, eval_dataset = rows
    configs = List(
        [
            RFModelConfig(
                model_name="tiny", peft_config=RFLoraConfig(r=4, lora_alpha=8, **LORA),
                training_args=sft(learning_rate=lr), formatting_func=to_prompt_completion,
            )
            for lr in (1e-2, 1e-5)
        ]
    )  # fmt: skip
    experiment = Experiment(experiment_name="explore", experiment_path=tmp_path)
    experiment.run_fit(configs, ModelFactory(), train_dataset, eval_dataset, num_chunks=4, policies=[Explore(top=1)])
    info = experiment.get_runs_info().set_index("run_id")
    clones = info[info["parent"].notna()]
    assert len(clones) >= 1 and list(clones.index) == list(range(3, 3 + len(clones)))
    assert set(clones["status"]) == {"completed"} and set(clones["group"]) == {"group-1"}
    assert clones.iloc[0]["config"]["model_name"] == "tiny" and clones.iloc[0]["run_name"].startswith("run-")
    assert set(experiment.get_results()["run_id"]) == set(info.index)
    saved = json.loads((tmp_path / "explore" / "runs.json").read_text())["runs"]
    assert len(saved) == len(info) and all(r["status"] in ("completed", "stopped") for r in saved)


@pytest.mark.parametrize(
    ("create_model_fn", "message"),
    [
        (lambda config: None, "create_model_fn failed: ValueError: create_model_fn returned NoneType"),
        (
            lambda config: build_tiny_model(build_tokenizer()),
            "create_model_fn returned no tokenizer for model 'tiny'",
        ),
        (lambda config: 1 / 0, "create_model_fn failed: ZeroDivisionError"),
    ],
)
def test_a_failing_create_model_fn_fails_its_runs_with_the_reason(rows, tmp_path, create_model_fn, message):
    train_dataset, _ = rows
    leaf = RFModelConfig(
        model_name="tiny", peft_config=RFLoraConfig(r=4, **LORA), training_args=sft(),
        formatting_func=to_prompt_completion,
    )  # fmt: skip
    experiment = Experiment(experiment_name="broken", experiment_path=tmp_path)
    experiment.run_fit(List([leaf]), create_model_fn, train_dataset, num_chunks=2)
    (row,) = experiment.get_runs_info().to_dict("records")
    assert row["status"] == "failed" and message in row["error"]
    assert json.loads((tmp_path / "broken" / "runs.json").read_text())["runs"][0]["status"] == "failed"
