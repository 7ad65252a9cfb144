"""Fused multi-adapter training: several runs in one forward/backward equal rotation within summation-order noise."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig
from test_exactness import adapter_weights, max_abs_diff
from transformers import TrainerCallback, set_seed

from rf_callbacks import RFGRPOTrainer, RFSFTTrainer
from rf_callbacks.fused_lora import concat_batches, mixed_adapters, round_forwards

# Different ranks, alphas, learning rates, target modules, batch sizes and gradient accumulation.
FOUR_RUNS = [
    {"name": "a", "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])},
    {
        "name": "b",
        "peft_config": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"),
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
    },
    {
        "name": "c",
        "peft_config": LoraConfig(r=2, lora_alpha=16, target_modules=["o_proj", "down_proj"], use_rslora=True),
        "learning_rate": 5e-4,
        "per_device_train_batch_size": 2,
        "max_length": 48,
    },
    {
        "name": "d",
        "peft_config": LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "k_proj"]),
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.1,
    },
]


def train(make_model, tokenizer, data, args, *, fused, configs=FOUR_RUNS, **kwargs):
    set_seed(args.seed)
    trainer = RFSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=data[0],
        eval_dataset=data[1],
        processing_class=tokenizer,
        configs=copy.deepcopy(configs),
        num_chunks=3,
        fused=fused,
        **kwargs,
    )
    trainer.train()
    return trainer


# The same runs with one micro-batch size: the fused rounds take the stacked (`bmm`) path instead of the looped one.
EQUAL_BATCHES = [{k: v for k, v in config.items() if k != "per_device_train_batch_size"} for config in FOUR_RUNS]


@pytest.mark.parametrize("configs", [FOUR_RUNS, EQUAL_BATCHES], ids=["looped", "stacked"])
def test_fused_matches_rotation(make_model, tokenizer, chat_data, sft_args, tmp_path, configs):
    kwargs = {"configs": configs}
    rotation = train(make_model, tokenizer, chat_data, sft_args(output_dir=tmp_path / "rot"), fused=False, **kwargs)
    fused = train(make_model, tokenizer, chat_data, sft_args(output_dir=tmp_path / "fused"), fused=True, **kwargs)
    rows = {row["name"]: row for row in fused.results()}
    for run in "abcd":
        assert rows[run]["status"] == "completed"
        assert rows[run]["global_step"] == rotation.runs[run].state.global_step == 12
        diff = max_abs_diff(adapter_weights(rotation.model, run), adapter_weights(fused.model, run))
        print(f"{run}: max abs diff fused vs rotation {diff:.2e}")
        assert diff < 1e-4, (run, diff)
        weights = adapter_weights(fused.model, run)
        assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 1e-3  # B starts at zero
        expected = [(e["step"], e["loss"]) for e in rotation.runs[run].state.log_history if "loss" in e]
        got = [(e["step"], e["loss"]) for e in fused.runs[run].state.log_history if "loss" in e]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
        assert rows[run]["eval_loss"] == pytest.approx(rotation.runs[run].result()["eval_loss"], rel=1e-4)
    # The ledger shows the runs' steps interleaved: they trained together, not one after another.
    ledger = [json.loads(line) for line in (tmp_path / "fused" / "ledger.jsonl").read_text().splitlines()]
    logs = [e["run"] for e in ledger if "loss" in e]
    assert logs[:7] == ["a", "c", "d", "a", "b", "c", "d"]  # b logs every second round (gradient accumulation 2)


def test_concat_batches_pads_each_key_and_keeps_rows():
    one = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)}
    two = {"input_ids": torch.full((1, 5), 2), "labels": torch.full((1, 5), 2)}
    batch, rows, lengths = concat_batches([one, two])
    assert rows == [slice(0, 2), slice(2, 3)] and lengths == [3, 5]
    assert batch["input_ids"].tolist()[0] == [1, 1, 1, 0, 0]
    assert batch["labels"].tolist()[1] == [1, 1, 1, -100, -100]  # padding never counts in a loss
    with pytest.raises(ValueError, match="different keys"):
        concat_batches([one, {"input_ids": two["input_ids"]}])


def _paths(layers) -> set[str]:
    """Which forward each layer takes in a round: a `_FusedLinears` block (with its layer count) or a plan's path."""
    from rf_callbacks.fused_lora import _block_forward

    found = set()
    for layer in layers:
        forward = layer.forward
        found.add(f"block{len(forward.args[1].layers)}" if forward.func is _block_forward else forward.args[1].path)
    return found


@pytest.mark.parametrize(
    ("sizes", "dropout", "mode", "paths"),
    [
        ((2, 1), 0.0, "alone", {"looped"}),
        ((2, 2), 0.0, "hooked", {"stacked"}),
        ((2, 2), 0.0, "alone", {"block1"}),
        ((2, 2), 0.0, "siblings", {"block1", "block2"}),
        ((2, 2), 0.1, "alone", {"stacked_dropout"}),
    ],
    ids=["looped", "stacked", "base-in-node", "siblings", "stacked-dropout"],
)
def test_mixed_forward_equals_each_adapter_alone(make_model, sizes, dropout, mode, paths):
    """Rows of a mixed batch get what PEFT's own forward gives them with their adapter alone, and each adapter gets the
    gradient of its own rows' loss. Unequal segments take the looped path, equal ones a stacked (`bmm`) path: over a
    plain `nn.Linear` base one `_FusedLinears` node (base included) per layer, or per group of sibling layers that read
    the same input when the layers' names are given (here q/v and gate/up, where only one adapter is present); over a
    base with a hook `_StackedLoRA` (the adapters alone); with LoRA dropout modules the op-by-op stacked products
    (checked in eval mode, where the dropout modules pass rows through, so both sides see the same rows). The adapters
    differ in rank and target modules, so the stacked paths also pad ranks and skip absent adapters."""
    from helpers import cpu_sft_config
    from peft.tuners.lora import Linear as LoraLinear

    from rf_callbacks.adapters import attach_adapters
    from rf_callbacks.configs import parse_configs

    targets = (["q_proj", "v_proj"], ["v_proj", "up_proj"])
    if mode == "siblings":
        targets = (["q_proj", "k_proj", "v_proj"], ["q_proj", "v_proj", "gate_proj", "up_proj"])
    configs = [
        {"name": "x", "peft_config": LoraConfig(r=4, target_modules=targets[0], init_lora_weights=False)},
        {"name": "y", "peft_config": LoraConfig(r=2, target_modules=targets[1], init_lora_weights=False)},
    ]
    for config in configs:
        config["peft_config"].lora_dropout = dropout
    specs = parse_configs(configs, cpu_sft_config("unused"), None, set(), lambda name: name)
    model = attach_adapters(make_model(), specs).train(mode=not dropout)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    ids = torch.randint(4, 100, (sum(sizes), 7))
    x_rows, y_rows = slice(0, sizes[0]), slice(sizes[0], sum(sizes))
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    layers = [m for _, m in named]
    if mode == "hooked":
        for layer in layers:
            layer.base_layer.register_forward_pre_hook(lambda module, args: None)

    def grads():
        found = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return found

    names = [name for name, _ in named] if mode == "siblings" else None
    with mixed_adapters(round_forwards(layers, [("x", x_rows), ("y", y_rows)], names)):
        assert _paths(layers) == paths
        mixed = model(input_ids=ids).logits
        (mixed[x_rows].square().mean() + mixed[y_rows].square().mean()).backward()
    mixed_grads = grads()
    alone, alone_grads = {}, {}
    for adapter, rows in (("x", x_rows), ("y", y_rows)):
        model.base_model.set_adapter(adapter)
        for name, param in model.named_parameters():  # `set_adapter` also sets `requires_grad`
            param.requires_grad_("lora_" in name)
        alone[adapter] = model(input_ids=ids[rows]).logits
        alone[adapter].square().mean().backward()
        alone_grads.update({n: g for n, g in grads().items() if f".{adapter}." in n})
    # The siblings' concatenated base products sum in another order: on an AVX-512 CPU the logits (~3 in size) of
    # this model differ by up to 2e-5 after its layers, so the siblings' bounds are 10x wider (logits and gradients).
    for adapter, rows in (("x", x_rows), ("y", y_rows)):
        diff = (mixed[rows] - alone[adapter]).abs().max().item()
        assert diff <= (1e-4 if mode == "siblings" else 1e-5), (adapter, diff)
    assert mixed_grads.keys() == alone_grads.keys()
    assert any(".x." in name for name in mixed_grads) and any(".y." in name for name in mixed_grads)
    atol = 1e-5 if mode == "siblings" else 1e-6
    for name, grad in mixed_grads.items():
        assert torch.allclose(grad, alone_grads[name], atol=atol), (name, (grad - alone_grads[name]).abs().max())
    with torch.no_grad():  # the adapters differ, so the check above can fail
        assert not torch.allclose(mixed[x_rows], model(input_ids=ids[x_rows]).logits, atol=1e-3)  # y active


def test_fused_policies_nan_isolation_and_non_lora_runs(tokenizer, chat_data, sft_args, tmp_path):
    """Successive halving decides the same in fused mode; a NaN run fails alone; a DoRA run rotates by itself."""
    from test_policies import PoisonAt, four_configs, trainer_with

    from rf_callbacks.policies import SuccessiveHalving

    results = {}
    for fused in (False, True):
        trainer = trainer_with(
            tokenizer, chat_data, sft_args, tmp_path / f"sh-{fused}", [SuccessiveHalving(eta=2)], fused=fused
        )
        trainer.train()
        results[fused] = trainer
    assert [(r["status"], r["global_step"]) for r in results[True].results()] == [
        (r["status"], r["global_step"]) for r in results[False].results()
    ]
    winner = next(r["name"] for r in results[True].results() if r["status"] == "completed")
    assert (
        max_abs_diff(adapter_weights(results[False].model, winner), adapter_weights(results[True].model, winner))
        < 1e-4
    )

    configs = four_configs()
    configs[3]["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    trained = {}
    for fused in (False, True):
        trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path / f"nan-{fused}", None, configs, fused=fused)
        trainer.add_callback(PoisonAt(trainer, "lr1", 4, float("nan")))
        trainer.train()
        trained[fused] = trainer
    rows = {row["name"]: row for row in trained[True].results()}
    assert (rows["lr1"]["status"], rows["lr1"]["error"]) == ("failed", "FloatingPointError: loss is nan at step 5")
    for name in ("lr0", "lr2", "lr3"):
        assert rows[name]["status"] == "completed"
        diff = max_abs_diff(adapter_weights(trained[False].model, name), adapter_weights(trained[True].model, name))
        assert diff < 1e-4, (name, diff)
    ledger = [json.loads(line) for line in (tmp_path / "nan-True" / "ledger.jsonl").read_text().splitlines()]
    logs = [e["run"] for e in ledger if "loss" in e and e["chunk"] == 0]
    assert logs == ["lr0", "lr1", "lr2"] * 3 + ["lr3"] * 3  # the DoRA run trains its chunk alone, after the group


class OpsAt(TrainerCallback):
    """Stop run b and clone it (warm) at a's step 2, resume b at a's step 7: ops arriving mid-chunk."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.active_run.name != "a":
            return
        if state.global_step == 2:
            self.trainer.stop("b")
            self.trainer.clone("b", {"learning_rate": 1e-4}, warm_start=True, name="b-slow")
        elif state.global_step == 7:
            self.trainer.resume("b")


def test_auto_group_size_follows_free_memory(tokenizer, chat_data, sft_args, tmp_path, monkeypatch):
    """`max_fused="auto"` on a CPU: groups of 4 until the activation bytes per row are measured, then as many runs as
    the available memory holds (here made to hold two)."""
    from test_policies import trainer_with

    from rf_callbacks import fused

    trainer = trainer_with(tokenizer, chat_data, sft_args, tmp_path, None, eval_set=False, fused=True)
    rows = 8  # per-run batch of `trainer_with`
    groups = trainer._rf_fused
    memory = lambda device: 2.5 * groups.row_bytes * rows / 0.8 if groups.row_bytes else 0  # noqa: E731
    monkeypatch.setattr(fused, "_free_memory", memory)
    trainer.train()
    assert groups.row_bytes > 1000  # bytes of saved activations per row, counted in the first group's rounds
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    logs = {chunk: [e["run"] for e in ledger if "loss" in e and e["chunk"] == chunk] for chunk in range(4)}
    assert logs[0] == ["lr0", "lr1", "lr2", "lr3"] * 3  # 3 steps per chunk, one group of four
    for chunk in (1, 2, 3):
        assert logs[chunk] == ["lr0", "lr1"] * 3 + ["lr2", "lr3"] * 3  # two groups of two


def test_fused_ic_ops_mid_chunk(make_model, tokenizer, chat_data, sft_args, tmp_path):
    reference = train(
        make_model, tokenizer, chat_data, sft_args(output_dir=tmp_path / "ref"), fused=False, configs=FOUR_RUNS[:2]
    )
    set_seed(7)
    trainer = RFSFTTrainer(
        model=make_model(),
        args=sft_args(output_dir=tmp_path / "ops"),
        train_dataset=chat_data[0],
        processing_class=tokenizer,
        configs=copy.deepcopy(FOUR_RUNS[:2]),
        num_chunks=3,
        fused=True,
    )
    trainer.add_callback(OpsAt(trainer))
    trainer.train()
    rows = {row["name"]: row for row in trainer.results()}
    assert {name: row["status"] for name, row in rows.items()} == {
        "a": "completed",
        "b": "completed",
        "b-slow": "completed",
    }
    assert rows["b-slow"]["parent"] == "b" and rows["b-slow"]["global_step"] == 12
    for name in ("a", "b"):  # stopping and resuming a run does not change where it ends
        assert max_abs_diff(adapter_weights(reference.model, name), adapter_weights(trainer.model, name)) < 1e-4


def test_fused_checkpoint_resume_is_exact(tokenizer, chat_data, sft_args, tmp_path):
    from test_checkpoint import make_trainer

    complete = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "complete", fused=True)
    complete.train()

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                raise KeyboardInterrupt  # like a Ctrl-C: not a run failure, it ends train()

    crashed = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "crashed", fused=True)
    crashed.add_callback(Crash())
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = make_trainer(tokenizer, chat_data, sft_args, tmp_path / "crashed", fused=True)
    resumed.train(resume_from_checkpoint=True)
    for name in ("a", "b"):
        assert max_abs_diff(adapter_weights(complete.model, name), adapter_weights(resumed.model, name)) == 0.0
    assert [r["train_loss"] for r in resumed.results()] == [r["train_loss"] for r in complete.results()]


def test_fused_refusals(make_model, tokenizer, chat_data, sft_args):
    with pytest.raises(ValueError, match="fused=True is not supported by RFGRPOTrainer"):
        RFGRPOTrainer(model=make_model(), fused=True)
    kwargs = dict(train_dataset=chat_data[0], processing_class=tokenizer, configs=copy.deepcopy(FOUR_RUNS[:2]))
    with pytest.raises(ValueError, match="max_fused=0 is invalid"):
        RFSFTTrainer(model=make_model(), args=sft_args(), fused=True, max_fused=0, **kwargs)
    with pytest.raises(ValueError, match="fused=True cannot be combined with compute_loss_func"):
        RFSFTTrainer(model=make_model(), args=sft_args(), fused=True, compute_loss_func=lambda *a, **k: 0, **kwargs)
    with pytest.raises(ValueError, match="fused=True cannot be combined with padding_free"):
        RFSFTTrainer(model=make_model(), args=sft_args(padding_free=True, max_length=None), fused=True, **kwargs)


@pytest.mark.parametrize("configs", [FOUR_RUNS, EQUAL_BATCHES], ids=["looped", "stacked"])
def test_fused_bf16_autocast_trains_like_rotation(make_model, tokenizer, chat_data, sft_args, tmp_path, configs):
    """`bf16=True` (CPU autocast): the fused round's hand-written backward runs in the forward's autocast state."""
    runs = {}
    for fused in (False, True):
        args = sft_args(output_dir=tmp_path / str(fused), bf16=True, max_steps=4)
        trainer = train(make_model, tokenizer, chat_data, args, fused=fused, configs=configs)
        rows = {row["name"]: row for row in trainer.results()}
        assert all(row["status"] == "completed" for row in rows.values()), rows
        runs[fused] = trainer
    for run in "abcd":
        diff = max_abs_diff(adapter_weights(runs[False].model, run), adapter_weights(runs[True].model, run))
        print(f"{run}: max abs diff fused vs rotation under bf16 {diff:.2e}")
        assert diff < 5e-3, (run, diff)  # bf16 products: summation order moves the last bits of 8-bit mantissas
        weights = adapter_weights(runs[True].model, run)
        assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 1e-3  # it trained
