"""Time to winner: how soon the best of a grid of configs is known, and trained, three ways, side by side in one run.

(a) every config trained to the end one after another with plain `SFTTrainer` (each loading the model, as a user's
    loop would); the winner is the best final eval loss. Measured once for the largest grid; a smaller grid's time is
    the sum over its configs.
(b) what TRL users reach for today: sequential Optuna trials (`GridSampler` over the same grid, the same reduction
    factor, `SuccessiveHalvingPruner`), each a plain `SFTTrainer` evaluated at the same rung chunks as (c). The result
    depends on the order of the trials, so it runs over several orders (`GridSampler` seeds): median and worst.
(c) `RFSFTTrainer` + `SuccessiveHalving` (same rungs), evaluating only at rungs and at the end (`boundary_eval=False`).

Time to decision: the moment one config is left (a sequential search knows only when its last trial ends). Time to
trained winner: the winner's adapter is trained to the end. "same pick" says whether the method picks (a)'s winner;
"gap" is its final eval loss minus (a)'s best. A Llama-shaped model with ~5M parameters (hidden 256, 4 layers), fp32:

    python benchmarks/time_to_winner.py                       # 8 and 16 configs, 5 orders
    python benchmarks/time_to_winner.py --hidden 64 --layers 2 --orders 2 --sizes 8   # a quick look

On a GPU (`--device cuda`) use a bigger model (`--hidden 2048 --layers 16` is ~1B parameters). The last line of stdout
is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from rf_callbacks import RFSFTTrainer  # noqa: E402
from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets  # noqa: E402
from rf_callbacks.ledger import read_ledger  # noqa: E402
from rf_callbacks.policies import SuccessiveHalving  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()
optuna.logging.set_verbosity(optuna.logging.WARNING)

LEARNING_RATES = (2e-4, 5e-4, 1e-3, 2e-3)
RANKS = {8: (4, 16), 16: (2, 4, 8, 16)}


def grid(size: int) -> list[tuple[float, int]]:
    return [(lr, r) for lr in LEARNING_RATES for r in RANKS[size]]


def name(lr: float, r: int) -> str:
    return f"lr{lr:g}-r{r}"


def peft_config(r: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")


class Setup:
    def __init__(self, opts, work: str):
        self.opts, self.work = opts, work
        self.tokenizer = build_tokenizer()
        train, val = demo_datasets()
        self.train, self.eval = train.select(range(opts.rows)), val.select(range(opts.eval_rows))
        self.model_dir = f"{work}/base"
        build_tiny_model(self.tokenizer, hidden_size=opts.hidden, num_layers=opts.layers).save_pretrained(
            self.model_dir
        )
        self.steps_per_epoch = opts.rows // opts.batch
        self.steps = self.steps_per_epoch * opts.epochs
        self.steps_per_chunk = self.steps_per_epoch // opts.chunks
        slices = opts.chunks * opts.epochs
        self.rungs = [opts.min_chunks * opts.eta**k for k in range(16) if opts.min_chunks * opts.eta**k <= slices]

    def args(self, out: str, **overrides) -> SFTConfig:
        use_cpu = self.opts.device == "cpu"
        return SFTConfig(
            output_dir=out,
            num_train_epochs=self.opts.epochs,
            per_device_train_batch_size=self.opts.batch,
            per_device_eval_batch_size=self.opts.eval_batch,
            max_length=128,
            logging_steps=self.steps_per_chunk,
            bf16=not use_cpu and torch.cuda.is_bf16_supported(),
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=use_cpu,
            seed=0,
            **overrides,
        )

    def model(self):
        return AutoModelForCausalLM.from_pretrained(self.model_dir)


# --------------------------------------------------------------------------------------------------- (a)
def plain_trainer(setup: Setup, lr: float, r: int, out: str, callbacks=()) -> SFTTrainer:
    """What a user's loop builds per config: load the model, seed, build a plain `SFTTrainer`."""
    model = setup.model()
    set_seed(0)
    trainer = SFTTrainer(
        model=model,
        args=setup.args(out, learning_rate=lr),
        train_dataset=setup.train,
        eval_dataset=setup.eval,
        processing_class=setup.tokenizer,
        peft_config=peft_config(r),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def plain_all(setup: Setup, size: int) -> dict:
    per_config = {}
    for lr, r in grid(size):
        started = time.perf_counter()
        trainer = plain_trainer(setup, lr, r, f"{setup.work}/plain-{name(lr, r)}")
        trainer.train()
        loss = trainer.evaluate()["eval_loss"]
        per_config[name(lr, r)] = {"seconds": time.perf_counter() - started, "eval_loss": loss}
        print(
            f"  (a) {name(lr, r):>14}: {per_config[name(lr, r)]['seconds']:6.1f} s  eval_loss {loss:.4f}", flush=True
        )
    return per_config


# --------------------------------------------------------------------------------------------------- (b)
class ReportAtRungs(TrainerCallback):
    """Evaluate at the rung chunks, report to Optuna, stop the trial when the pruner says so."""

    def __init__(self, trial, steps_per_chunk: int, rungs: list[int]):
        self.trial, self.steps_per_chunk, self.rungs = trial, steps_per_chunk, rungs
        self.pruned, self.last = False, (None, None)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps_per_chunk == 0 and state.global_step // self.steps_per_chunk in self.rungs:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        chunk = state.global_step // self.steps_per_chunk
        self.last = (state.global_step, metrics["eval_loss"])
        self.trial.report(metrics["eval_loss"], chunk)
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True


def optuna_search(setup: Setup, size: int, order: int) -> dict:
    opts = setup.opts
    space = {"lr": list(LEARNING_RATES), "r": list(RANKS[size])}
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.GridSampler(space, seed=order),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=opts.min_chunks, reduction_factor=opts.eta, min_early_stopping_rate=0
        ),
    )
    order_seen = []

    def objective(trial):
        lr, r = trial.suggest_categorical("lr", space["lr"]), trial.suggest_categorical("r", space["r"])
        order_seen.append(name(lr, r))
        callback = ReportAtRungs(trial, setup.steps_per_chunk, setup.rungs)
        trainer = plain_trainer(setup, lr, r, f"{setup.work}/optuna-{size}-{order}-{trial.number}", [callback])
        trainer.train()
        if callback.pruned:
            raise optuna.TrialPruned()
        step, loss = callback.last
        return loss if step == trainer.state.global_step else trainer.evaluate()["eval_loss"]

    started = time.perf_counter()
    study.optimize(objective, n_trials=len(grid(size)))
    seconds = time.perf_counter() - started
    best = study.best_trial
    completed = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return {
        "order": order_seen,
        "seconds": seconds,
        "winner": name(best.params["lr"], best.params["r"]),
        "completed_trials": completed,
    }


# --------------------------------------------------------------------------------------------------- (c)
def rotation(setup: Setup, size: int) -> dict:
    opts = setup.opts
    out = f"{setup.work}/rotation-{size}"
    started_wall, started = time.time(), time.perf_counter()
    model = setup.model()
    set_seed(0)
    trainer = RFSFTTrainer(
        model=model,
        args=setup.args(out, learning_rate=LEARNING_RATES[0]),
        train_dataset=setup.train,
        eval_dataset=setup.eval,
        processing_class=setup.tokenizer,
        configs=[{"name": name(lr, r), "peft_config": peft_config(r), "learning_rate": lr} for lr, r in grid(size)],
        num_chunks=opts.chunks,
        policies=[SuccessiveHalving(eta=opts.eta, min_chunks=opts.min_chunks)],
        boundary_eval=False,
        control_socket=False,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seconds = time.perf_counter() - started
    stops = [r for r in read_ledger(f"{out}/ledger.jsonl") if r["event"] == "op_applied" and r["op"] == "stop"]
    decision = max(r["time"] for r in stops) - started_wall
    (winner,) = [row for row in trainer.results() if row["status"] == "completed"]
    trainer.close()
    return {"seconds": seconds, "decision": decision, "winner": winner["name"], "eval_loss": winner["eval_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,16", help="grid sizes, from 8 and 16 (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256, help="training rows (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=64, help="chunks per epoch (default: %(default)s)")
    parser.add_argument("--eta", type=int, default=4)
    parser.add_argument("--min-chunks", type=int, default=1)
    parser.add_argument("--orders", type=int, default=5, help="trial orders for Optuna (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    opts = parser.parse_args()
    sizes = sorted(int(s) for s in opts.sizes.split(","))
    if any(s not in RANKS for s in sizes):
        parser.error(f"--sizes must be taken from {sorted(RANKS)}")
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as work:
        setup = Setup(opts, work)
        params = sum(p.numel() for p in setup.model().parameters())
        print(
            f"model: hidden {opts.hidden}, {opts.layers} layers, {params / 1e6:.1f}M parameters, {opts.device}; "
            f"{opts.rows} rows x {opts.epochs} epochs = {setup.steps} steps of batch {opts.batch}; "
            f"{opts.chunks} chunks of {setup.steps_per_chunk} step(s) per epoch; "
            f"rungs at chunks {setup.rungs} (eta {opts.eta}); "
            f"eval set {opts.eval_rows} rows",
            flush=True,
        )
        plain = plain_all(setup, max(sizes))
        results = {}
        for size in sizes:
            names = [name(lr, r) for lr, r in grid(size)]
            a_seconds = sum(plain[n]["seconds"] for n in names)
            a_winner = min(names, key=lambda n: plain[n]["eval_loss"])
            best = plain[a_winner]["eval_loss"]
            searches = []
            for order in range(opts.orders):
                searches.append(optuna_search(setup, size, order))
                s = searches[-1]
                print(f"  (b) {size} configs, order {order}: {s['seconds']:6.1f} s  winner {s['winner']}", flush=True)
            c = rotation(setup, size)
            print(f"  (c) {size} configs: {c['seconds']:6.1f} s  winner {c['winner']}", flush=True)
            b_times = [s["seconds"] for s in searches]
            results[size] = {
                "a": {"decision": a_seconds, "trained": a_seconds, "winner": a_winner, "gap": 0.0},
                "b": {
                    "median": statistics.median(b_times),
                    "worst": max(b_times),
                    "winners": [s["winner"] for s in searches],
                    "same_pick": sum(s["winner"] == a_winner for s in searches),
                    "gaps": [plain[s["winner"]]["eval_loss"] - best for s in searches],
                    "runs": searches,
                },
                "c": {
                    **c,
                    "same_pick": c["winner"] == a_winner,
                    "gap": c["eval_loss"] - best,
                    "matches_plain": c["eval_loss"] == plain[c["winner"]]["eval_loss"],
                },
            }

    print()
    print("| configs | method | time to decision (s) | time to trained winner (s) | vs (a) | same pick as (a) | gap |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for size, r in results.items():
        a, b, c = r["a"], r["b"], r["c"]
        print(f"| {size} | (a) all configs, plain TRL | {a['decision']:.1f} | {a['trained']:.1f} | 1.0x | - | 0 |")
        b_line = f"{b['median']:.1f} (worst {b['worst']:.1f})"
        print(
            f"| {size} | (b) Optuna SH pruner, {opts.orders} orders | {b_line} | {b_line} | "
            f"{a['trained'] / b['median']:.1f}x | {b['same_pick']}/{opts.orders} | "
            f"max {max(b['gaps']):.4f} |"
        )
        print(
            f"| {size} | (c) RFSFTTrainer + SuccessiveHalving | {c['decision']:.1f} | {c['seconds']:.1f} | "
            f"{a['trained'] / c['seconds']:.1f}x | {'yes' if c['same_pick'] else 'no'} | {c['gap']:.4f} |"
        )
        summary[size] = {
            "trained_speedup_vs_a": a["trained"] / c["seconds"],
            "limit": size,
            "share_of_limit": a["trained"] / c["seconds"] / size,
            "trained_vs_b_median": b["median"] / c["seconds"],
            "decision_vs_b_median": b["median"] / c["decision"],
        }
        s = summary[size]
        print(
            f"  {size} configs: (c) trains the winner {s['trained_speedup_vs_a']:.1f}x sooner than (a) "
            f"(limit {size}x, {100 * s['share_of_limit']:.0f}% of it), "
            f"{s['trained_vs_b_median']:.1f}x sooner than (b)'s median; "
            f"decides {s['decision_vs_b_median']:.1f}x sooner than (b)'s median"
        )
    print(
        json.dumps(
            {
                "benchmark": "time_to_winner",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "device": opts.device,
                "date": time.strftime("%Y-%m-%d"),
                "settings": vars(opts),
                "parameters": params,
                "rungs": setup.rungs,
                "plain_per_config": plain,
                "results": results,
                "summary": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
