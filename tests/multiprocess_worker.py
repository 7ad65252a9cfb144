"""The experiments of `tests/test_multiprocess.py`, run in one process (the reference) or under
`accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_worker.py OUT [SCENARIO ...]` (CPU: the
arguments say `use_cpu=True`) (each rank writes
`OUT/<scenario>/rank<r>.json`: its `results()`, every run's log history and the coordination counters)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCENARIOS = ("configs", "ops", "data", "policy", "nan")


def _configs(scenario: str) -> list[dict]:
    from peft import LoraConfig

    def lora(r: int = 4, dropout: float = 0.1) -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])

    if scenario in ("crash", "resume"):
        return _configs("configs")
    if scenario in ("data", "nan"):  # dropout off: each process draws masks for its part of the batch only
        return [
            {"name": "a", "peft_config": lora(dropout=0.0)},
            {"name": "b", "peft_config": lora(8, dropout=0.0), "learning_rate": 3e-3},
        ]
    if scenario == "policy":  # successive halving on rank 0: 4 runs, 2 after chunk 0, 1 after chunk 1
        rates = (1e-3, 2e-3, 3e-3, 4e-3)
        return [
            {"name": f"p{i}", "peft_config": lora(4 + 4 * (i % 2)), "learning_rate": rate}
            for i, rate in enumerate(rates)
        ]
    # a and c end after the first chunk, so b and d (both on rank 1) are rebalanced: one of them moves to rank 0
    return [
        {"name": "a", "peft_config": lora(), "max_steps": 4},
        {"name": "b", "peft_config": lora(8), "learning_rate": 3e-3},
        {"name": "c", "peft_config": lora(), "max_steps": 4, "learning_rate": 5e-4},
        {"name": "d", "peft_config": lora(4), "per_device_train_batch_size": 2, "max_steps": 10},
    ]


class _OpMidChunk:
    """On rank 0, while run a is at its second step of chunk 0: stop run b and clone a (warm start)."""

    def __init__(self):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def __init__(self, owner):
                self.owner, self.trainer, self.done = owner, None, False

            def on_step_end(self, args, state, control, **kwargs):
                trainer = self.trainer
                active = trainer.active_run
                main = trainer._rf_dist is None or trainer._rf_dist.main
                if main and not self.done and active is not None and active.name == "a" and state.global_step == 2:
                    self.done = True
                    trainer.stop("b")
                    trainer.clone("a", {"learning_rate": 2e-3}, warm_start=True, name="a2")

        self.callback = Callback(self)


class _PoisonOnRank1:
    """Data-parallel fault: on rank 1 only, run b's adapter turns NaN after its step 2 (its loss there is NaN)."""

    def __new__(cls, trainer):
        import torch
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                active = trainer.active_run
                if trainer._rf_dist.rank == 1 and active.name == "b" and state.global_step == 2:
                    with torch.no_grad():
                        for param in active.trainable:
                            param.fill_(float("nan"))

        return Callback()


class _Kill:
    """Kill the process that trains run b at its step 6 (in its second chunk), as a crash would."""

    def __new__(cls, trainer):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                active = trainer.active_run
                if active is not None and active.name == "b" and state.global_step == 6:
                    os._exit(3)

        return Callback()


def build(scenario: str, out: str | os.PathLike, parallel: str = "auto", per_device: int | None = None):
    from helpers import cpu_sft_config

    from rf_callbacks import RFSFTTrainer
    from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets
    from rf_callbacks.policies import SuccessiveHalving

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    train, val = demo_datasets()
    overrides = {"max_steps": 12 if scenario == "policy" else 8, "per_device_train_batch_size": per_device or 4}
    if scenario in ("crash", "resume"):  # experiment checkpoints at every round
        overrides.update(save_strategy="steps", save_steps=1000)
    args = cpu_sft_config(out, eval_strategy="no", **overrides)
    hook = _OpMidChunk() if scenario == "ops" else None
    trainer = RFSFTTrainer(
        model=model,
        args=args,
        train_dataset=train.select(range(48)),
        eval_dataset=val.select(range(8)),
        processing_class=tokenizer,
        configs=_configs(scenario),
        num_chunks=3,
        parallel=parallel,
        callbacks=[hook.callback] if hook else None,
        policies=[SuccessiveHalving()] if scenario == "policy" else None,
        checkpoint_every=1 if scenario in ("crash", "resume") else None,
    )
    if scenario == "crash":
        trainer.add_callback(_Kill(trainer))
    if scenario == "nan" and trainer._rf_dist is not None:
        trainer.add_callback(_PoisonOnRank1(trainer))
    if hook:
        hook.callback.trainer = trainer
    return trainer


def summary(trainer) -> dict:
    coordination = trainer._rf_dist
    return {
        "results": trainer.results(),
        "logs": {run.name: run.state.log_history if run.state else [] for run in trainer.coordinator},
        "rounds": coordination.rounds if coordination else None,
        "migrations": coordination.migrations if coordination else None,
        "mode": coordination.mode if coordination else None,
    }


def main() -> None:
    import torch.distributed as dist

    out = Path(sys.argv[1])
    for scenario in sys.argv[2:] or SCENARIOS:
        folder = out / scenario
        # data-parallel: 2 processes x 2 rows = the reference's 4 rows per optimizer step
        if scenario in ("data", "nan"):
            trainer = build(scenario, folder, parallel="data", per_device=2)
        else:
            trainer = build(scenario, "/".join([str(out), "resume"]) if scenario == "crash" else folder)
        trainer.train(resume_from_checkpoint=True if scenario == "resume" else None)
        rank = dist.get_rank() if dist.is_initialized() else 0
        (folder / f"rank{rank}.json").write_text(json.dumps(summary(trainer), default=str), encoding="utf-8")
        trainer.close()


if __name__ == "__main__":
    main()
