"""Streamed train sets (`IterableDataset` with `max_steps`): one run equals plain `SFTTrainer` on the same stream, a
run in rotation equals the same run alone, and what a stream cannot do is refused with the reason."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig
from test_exactness import adapter_weights, max_abs_diff, train_losses
from transformers import set_seed
from trl import DPOConfig, DPOTrainer, SFTTrainer

from rf_callbacks import RFDPOTrainer, RFSFTTrainer
from rf_callbacks.preference import load_preferences

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def stream(dataset, shuffle: bool = True):
    # 2 shards so `shuffle` reorders shards as well as its buffer, the way a hub stream is shuffled.
    streamed = dataset.to_iterable_dataset(num_shards=2)
    return streamed.shuffle(seed=3, buffer_size=16) if shuffle else streamed


def plain_sft(make_model, tokenizer, train, args, **kwargs):
    set_seed(args.seed)
    trainer = SFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(LORA),
        **kwargs,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_run_on_a_stream_equals_plain_sft_trainer(make_model, tokenizer, chat_data, sft_args, tmp_path, shuffle):
    train = chat_data[0]
    # 96 rows at batch 4 = 24 batches: 30 steps run the stream out once (Trainer restarts it with set_epoch(1)).
    plain = plain_sft(
        make_model, tokenizer, stream(train, shuffle), sft_args(output_dir=str(tmp_path / "p"), max_steps=30)
    )
    args = sft_args(output_dir=str(tmp_path / "o"), max_steps=30)
    set_seed(args.seed)
    ours = RFSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=stream(train, shuffle),
        processing_class=tokenizer,
        configs=[{"name": "a", "peft_config": LORA}],
        num_chunks=3,
    )
    ours.train()
    assert max_abs_diff(adapter_weights(plain.model, "default"), adapter_weights(ours.model, "a")) <= 1e-6
    assert train_losses(ours.runs["a"].state.log_history) == train_losses(plain.state.log_history)
    assert ours.runs["a"].global_step == 30


def test_runs_in_rotation_on_a_stream_each_equal_the_run_alone(make_model, tokenizer, chat_data, sft_args, tmp_path):
    train = chat_data[0]
    configs = [
        {"name": "a", "peft_config": LORA},
        {
            "name": "b",
            "peft_config": LoraConfig(r=8, target_modules="all-linear"),
            "learning_rate": 5e-4,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
        },
    ]

    def train_with(which, out):
        args = sft_args(output_dir=str(tmp_path / out), max_steps=16)
        set_seed(args.seed)
        trainer = RFSFTTrainer(
            model=make_model(),
            args=args,
            train_dataset=stream(train),
            processing_class=tokenizer,
            configs=which,
            num_chunks=4,
        )
        trainer.train()
        return trainer

    mixed = train_with(configs, "mixed")
    assert [row["status"] for row in mixed.results()] == ["completed"] * 2
    for config in configs:
        alone = train_with([config], config["name"])
        name = config["name"]
        assert max_abs_diff(adapter_weights(alone.model, name), adapter_weights(mixed.model, name)) == 0.0
        assert train_losses(mixed.runs[name].state.log_history) == train_losses(alone.runs[name].state.log_history)


def test_streamed_eval_set_equals_plain(make_model, tokenizer, chat_data, sft_args, tmp_path):
    train, val = chat_data
    kwargs = {"eval_strategy": "steps", "eval_steps": 4, "max_steps": 8}
    plain = plain_sft(
        make_model,
        tokenizer,
        stream(train),
        sft_args(output_dir=str(tmp_path / "p"), **kwargs),
        eval_dataset=stream(val, shuffle=False),
    )
    args = sft_args(output_dir=str(tmp_path / "o"), **kwargs)
    set_seed(args.seed)
    ours = RFSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=stream(train),
        eval_dataset=stream(val, shuffle=False),
        processing_class=tokenizer,
        configs=[{"name": "a", "peft_config": LORA}],
        num_chunks=2,
    )
    ours.train()

    def evals(history):
        return [(entry["step"], round(entry["eval_loss"], 6)) for entry in history if "eval_loss" in entry]

    assert evals(ours.runs["a"].state.log_history) == evals(plain.state.log_history) != []


def test_stream_without_max_steps_is_refused_naming_the_run(make_model, tokenizer, chat_data, sft_args):
    with pytest.raises(ValueError, match="max_steps"):
        RFSFTTrainer(
            model=make_model(),
            args=sft_args(max_steps=-1, num_train_epochs=1),
            train_dataset=stream(chat_data[0]),
            processing_class=tokenizer,
            configs=[{"name": "a", "peft_config": LORA}],
        )
    with pytest.raises(ValueError, match="oom_retry=True is not supported with a streamed train_dataset"):
        RFSFTTrainer(
            model=make_model(),
            args=sft_args(),
            train_dataset=stream(chat_data[0]),
            processing_class=tokenizer,
            configs=[{"name": "a", "peft_config": LORA}],
            oom_retry=True,
        )


def test_dpo_on_a_stream_equals_plain_dpo_trainer(make_model, tokenizer, tmp_path):
    train = load_preferences(conversational=True).select(range(32))

    def args(out):
        return DPOConfig(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=4,
            max_steps=10,
            learning_rate=1e-3,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            seed=5,
            bf16=False,
        )

    plain_args = args("p")
    set_seed(plain_args.seed)
    plain = DPOTrainer(
        model=make_model(),
        args=plain_args,
        train_dataset=stream(train),
        processing_class=tokenizer,
        peft_config=copy.deepcopy(LORA),
    )
    plain.train()
    ours_args = args("o")
    set_seed(ours_args.seed)
    ours = RFDPOTrainer(
        model=make_model(),
        args=ours_args,
        train_dataset=stream(train),
        processing_class=tokenizer,
        configs=[{"name": "a", "peft_config": LORA}],
        num_chunks=2,
    )
    ours.train()
    assert max_abs_diff(adapter_weights(plain.model, "default"), adapter_weights(ours.model, "a")) <= 1e-6
    assert train_losses(ours.runs["a"].state.log_history) == train_losses(plain.state.log_history)


def test_fused_on_a_stream_matches_rotation(make_model, tokenizer, chat_data, sft_args, tmp_path):
    from test_fused import FOUR_RUNS, train

    data = (stream(chat_data[0]), None)
    rotation = train(make_model, tokenizer, data, sft_args(output_dir=tmp_path / "rot"), fused=False)
    data = (stream(chat_data[0]), None)
    fused = train(make_model, tokenizer, data, sft_args(output_dir=tmp_path / "fused"), fused=True)
    for run in (config["name"] for config in FOUR_RUNS):
        assert fused.runs[run].state.global_step == 12
        assert max_abs_diff(adapter_weights(rotation.model, run), adapter_weights(fused.model, run)) < 1e-4


def test_crash_and_resume_on_a_stream_is_exact(tokenizer, chat_data, sft_args, tmp_path):
    """A run resumed in a fresh process reopens the stream and skips what it already trained on."""
    from test_checkpoint import make_trainer
    from transformers import TrainerCallback

    complete = make_trainer(tokenizer, (stream(chat_data[0]), None), sft_args, tmp_path / "complete")
    complete.train()

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                raise KeyboardInterrupt

    crashed = make_trainer(tokenizer, (stream(chat_data[0]), None), sft_args, tmp_path / "crashed")
    crashed.add_callback(Crash())
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = make_trainer(tokenizer, (stream(chat_data[0]), None), sft_args, tmp_path / "crashed")
    resumed.train(resume_from_checkpoint=True)
    for name in ("a", "b"):
        assert max_abs_diff(adapter_weights(complete.model, name), adapter_weights(resumed.model, name)) == 0.0
    assert [r["train_loss"] for r in resumed.results()] == [r["train_loss"] for r in complete.results()]


def test_streamed_grpo_engine_is_refused_with_the_reason(make_model, tokenizer, chat_data):
    from trl import GRPOConfig

    from rf_callbacks import RFGRPOTrainer

    prompts = chat_data[0].select_columns(["prompt"]).to_iterable_dataset()
    args = GRPOConfig(
        output_dir="/tmp/rf-grpo-stream",
        max_steps=4,
        per_device_train_batch_size=4,
        num_generations=4,
        use_cpu=True,
        report_to="none",
        max_completion_length=8,
    )
    with pytest.raises(ValueError, match="RFGRPOTrainer with configs needs a train set with a length"):
        RFGRPOTrainer(
            model=make_model(),
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            configs=[{"name": "a", "peft_config": LORA}],
        )
