"""One prepared GPU check for one H100/H200 without network, in under 8 minutes (run by `benchmarks/gpu_check.sh`).

The base model is built from a config (no download): a ~1.07B Llama shape (hidden 2048, 16 layers, 16 heads, MLP
8192, the demo tokenizer's 1024-token vocabulary) in bf16, saved once so the plain side can `from_pretrained` it as a
user's loop does. Checks, in order, each timed and recorded even when it fails:

1. `exactness`: under `full_determinism=True`, 2 configs rotated vs each trained alone: adapters bit-exact;
2. `offload`: pinned-memory optimizer offload, 4 configs: swap ms per boundary vs a chunk's training ms, with
   `offload_optimizer=True` and `False`;
3. `throughput`: `fused=True` vs rotation vs plain TRL (configs in turn), samples/s at K=4 and 8 (`--tiny`: 2, 4);
4. `memory`: peak GPU memory (allocated) of 8 configs vs 1 (on a CPU the code path only);
5. `time_to_winner`: 8 configs (`--tiny`: 4), `SuccessiveHalving(eta=2)` vs each config trained and evaluated in turn;
6. `oom_retry`: a real CUDA out-of-memory error (the caching allocator capped with
   `torch.cuda.set_per_process_memory_fraction` between the peaks of batch B and B/2) retried at half the batch;
7. `pytest`: `pytest -m gpu`.

    benchmarks/gpu_check.sh out/gpu                        # on the GPU machine
    python benchmarks/gpu_check.py out/cpu --device cpu --tiny   # every check on a tiny model, < 2 min on a CPU

It writes `OUT/results.md` (the table) and `OUT/results.json`, prints the table, and prints the JSON as its last
line. Checks left when `--budget-s` is spent are recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import datasets  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM, PrinterCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from rf_callbacks import RFSFTTrainer  # noqa: E402
from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets  # noqa: E402
from rf_callbacks.engine import MultiConfigMixin  # noqa: E402
from rf_callbacks.policies import SuccessiveHalving  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()

SHAPES = {
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "intermediate_size": 8192},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
}


def configs(count: int) -> list[dict]:
    ranks, rates = (4, 16), (2e-4, 5e-4, 1e-3, 2e-3)
    return [
        {
            "name": f"r{ranks[i % 2]}-lr{rates[(i // 2) % 4]:g}",
            "peft_config": LoraConfig(r=ranks[i % 2], lora_alpha=2 * ranks[i % 2], target_modules="all-linear"),
            "learning_rate": rates[(i // 2) % 4],
        }
        for i in range(count)
    ]


class Check:
    """The model on disk, the data and the settings every check shares."""

    def __init__(self, opts, work: str):
        self.opts, self.work = opts, work
        self.cuda = opts.device == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.steps = 4 if opts.tiny else 16  # optimizer steps per config in the timed checks
        # --tiny exercises every code path at K=2/4 (K=4/8 on the GPU): on a shared 2-core CPU each extra trainer's
        # set-up (model load, tokenization, PEFT wrapping) costs seconds.
        self.ks = (2, 4) if opts.tiny else (4, 8)
        self.tokenizer = build_tokenizer()
        train, val = demo_datasets()
        # num_chunks splits an epoch: one epoch = 32 steps (8 with --tiny), the longest budget here, so checks rotate.
        self.train = train.select(range(min(len(train), (8 if opts.tiny else 32) * opts.batch)))
        self.eval = val.select(range(8 if opts.tiny else 32))
        model = build_tiny_model(self.tokenizer, **SHAPES["tiny" if opts.tiny else "1b"]).to(self.dtype)
        self.params = sum(p.numel() for p in model.parameters())
        self.model_dir = f"{work}/base"
        model.save_pretrained(self.model_dir)
        del model

    def load(self):
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.opts.device)

    def args(self, out: str, steps: int, **overrides) -> SFTConfig:
        values = {
            "output_dir": f"{self.work}/{out}",
            "max_steps": steps,
            "per_device_train_batch_size": self.opts.batch,
            "per_device_eval_batch_size": 8,
            "max_length": 128,
            "logging_steps": max(1, steps // 4),
            "bf16": self.cuda,
            "gradient_checkpointing": False,
            "report_to": "none",
            "save_strategy": "no",
            "disable_tqdm": True,
            "use_cpu": not self.cuda,
            "seed": 0,
        }
        values.update(overrides)
        return SFTConfig(**values)

    def rotation(self, out: str, runs: list[dict], steps: int, chunks: int, args: dict | None = None, **kwargs):
        set_seed(0)
        trainer = RFSFTTrainer(
            model=self.load(),
            args=self.args(out, steps, **(args or {})),
            train_dataset=self.train,
            eval_dataset=kwargs.pop("eval_dataset", None),
            processing_class=self.tokenizer,
            configs=runs,
            num_chunks=chunks,
            control_socket=False,
            **kwargs,
        )
        trainer.remove_callback(PrinterCallback)
        return trainer

    def plain(self, out: str, config: dict, steps: int, evaluate: bool = False) -> SFTTrainer:
        set_seed(0)
        trainer = SFTTrainer(
            model=self.load(),
            args=self.args(out, steps, learning_rate=config["learning_rate"]),
            train_dataset=self.train,
            eval_dataset=self.eval if evaluate else None,
            processing_class=self.tokenizer,
            peft_config=config["peft_config"],
        )
        trainer.remove_callback(PrinterCallback)
        return trainer

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def timed(check: Check, trainer) -> float:
    check.sync()
    started = time.perf_counter()
    trainer.train()
    check.sync()
    return time.perf_counter() - started


def adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


# ----------------------------------------------------------------------------------------------------- the checks
def check_exactness(c: Check) -> dict:
    runs, steps = configs(2), 6 if c.opts.tiny else 12
    determinism = {"full_determinism": True}
    rotated = c.rotation("exact-both", runs, steps, 3, determinism)
    rotated.train()
    diffs = {}
    for run in configs(2):
        alone = c.rotation(f"exact-{run['name']}", [run], steps, 3, determinism)
        alone.train()
        name = run["name"].replace(".", "_")  # the PEFT adapter's name (module names cannot hold dots)
        a, b = adapter(rotated.model, name), adapter(alone.model, name)
        diffs[run["name"]] = max((a[k] - b[k]).abs().max().item() for k in a)
        assert a.keys() == b.keys()
        del alone
    exact = all(d == 0.0 for d in diffs.values())
    return {"ok": exact, "max_abs_diff": diffs, "steps": steps, "summary": f"bit-exact: {exact}"}


def check_offload(c: Check) -> dict:
    activate, train_steps = MultiConfigMixin._activate, MultiConfigMixin._train_steps
    swaps, slices = [], []

    def timed_activate(trainer, run):
        if trainer._rf_active is run or not run.attributes:  # nothing to swap, or a run's first set-up
            return activate(trainer, run)
        c.sync()
        started = time.perf_counter()
        activate(trainer, run)
        c.sync()
        swaps.append(time.perf_counter() - started)

    def timed_train_steps(trainer, *args, **kwargs):
        steps = train_steps(trainer, *args, **kwargs)
        started = time.perf_counter()
        result = yield from steps
        c.sync()
        slices.append(time.perf_counter() - started)
        return result

    out = {}
    MultiConfigMixin._activate, MultiConfigMixin._train_steps = timed_activate, timed_train_steps
    try:
        for offload in (True, False):
            swaps.clear(), slices.clear()
            trainer = c.rotation(f"offload-{offload}", configs(4), c.steps, 4, offload_optimizer=offload)
            trainer.train()
            parked = [r for r in trainer.runs.values() if r is not trainer._rf_active][0]
            states = [v for s in parked.attributes["optimizer"].state.values() for v in s.values() if v.dim() > 0]
            out[f"offload={offload}"] = {
                "swap_ms": 1000 * sum(swaps) / max(len(swaps), 1),
                "chunk_ms": 1000 * sum(slices) / max(len(slices), 1),
                "swaps": len(swaps),
                "parked_state_pinned": bool(states) and all(v.is_pinned() for v in states),
            }
            del trainer
    finally:
        MultiConfigMixin._activate, MultiConfigMixin._train_steps = activate, train_steps
    on = out["offload=True"]
    # On CPU-only torch nothing is pinned (pin_memory raises there), so the swap is the pointer switch only.
    ok = on["parked_state_pinned"] or not c.cuda
    pct = 100 * on["swap_ms"] / on["chunk_ms"]
    return {
        **out,
        "ok": ok,
        "summary": f"offload swap {on['swap_ms']:.1f} ms / chunk {on['chunk_ms']:.0f} ms ({pct:.2f}%)",
    }


def check_throughput(c: Check) -> dict:
    out, parts = {}, []
    for k in c.ks:
        rows = k * c.steps * c.opts.batch
        for method in ("plain", "rotation", "fused"):
            c.reset_peak()
            if method == "plain":
                seconds = 0.0
                for run in configs(k):
                    trainer = c.plain(f"tp-plain-{k}-{run['name']}", run, c.steps)
                    seconds += timed(c, trainer)
                    del trainer
            else:
                trainer = c.rotation(f"tp-{method}-{k}", configs(k), c.steps, 4, fused=method == "fused")
                seconds = timed(c, trainer)
                del trainer
            out[f"{method}/{k}"] = {"seconds": seconds, "samples_per_s": rows / seconds, "peak_mib": c.peak_mib()}
        speed = {m: out[f"{m}/{k}"]["samples_per_s"] for m in ("plain", "rotation", "fused")}
        out[f"fused_vs_rotation/{k}"] = speed["fused"] / speed["rotation"]
        out[f"rotation_vs_plain/{k}"] = speed["rotation"] / speed["plain"]
        parts.append(
            f"K={k}: fused/rot {speed['fused'] / speed['rotation']:.2f}x, rot/plain "
            f"{speed['rotation'] / speed['plain']:.2f}x"
        )
    return {**out, "ok": True, "summary": "; ".join(parts)}


def check_memory(c: Check) -> dict:
    out = {}
    for k in (1, c.ks[-1]):
        c.reset_peak()
        trainer = c.rotation(f"mem-{k}", configs(k), 4, 4)
        trainer.train()
        out[f"peak_mib_{k}"] = c.peak_mib()
        del trainer
    if not c.cuda:  # a process's RSS peak cannot be reset in-process; benchmarks/real_model.py measures it per child
        return {**out, "ok": True, "summary": "ran; peak GPU memory needs CUDA"}
    ratio = out[f"peak_mib_{c.ks[-1]}"] / out["peak_mib_1"]
    return {
        **out,
        "ratio": ratio,
        "ok": True,
        "summary": f"{out['peak_mib_1']:.0f} -> {out[f'peak_mib_{c.ks[-1]}']:.0f} MiB ({ratio:.2f}x)",
    }


def check_time_to_winner(c: Check) -> dict:
    steps, chunks, count = (4, 4, c.ks[-1]) if c.opts.tiny else (32, 8, 8)
    started, plain = time.perf_counter(), {}
    for run in configs(count):
        trainer = c.plain(f"ttw-plain-{run['name']}", run, steps, evaluate=True)
        trainer.train()
        plain[run["name"]] = trainer.evaluate()["eval_loss"]
        del trainer
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    trainer = c.rotation(
        "ttw-sh",
        configs(count),
        steps,
        chunks,
        eval_dataset=c.eval,
        boundary_eval=False,
        policies=[SuccessiveHalving(eta=2, min_chunks=1)],
    )
    trainer.train()
    halving_s = time.perf_counter() - started
    completed = [r for r in trainer.results() if r["status"] == "completed"]
    winner = min(completed, key=lambda r: r["eval_loss"])
    best = min(plain, key=plain.get)
    speedup = sequential_s / halving_s
    return {
        "ok": len(completed) >= 1,
        "sequential_s": sequential_s,
        "halving_s": halving_s,
        "speedup": speedup,
        "sequential_winner": best,
        "halving_winner": winner["name"],
        "gap": winner["eval_loss"] - plain[best],
        "summary": f"{sequential_s:.0f} s -> {halving_s:.0f} s ({speedup:.2f}x), same pick: {winner['name'] == best}",
    }


def check_oom_retry(c: Check) -> dict:
    if not c.cuda:
        return {"ok": None, "summary": "skipped: a real CUDA OOM needs CUDA"}
    big = c.opts.oom_batch
    peaks = {}
    for batch in (big, big // 2):  # calibrate: the allocator's reserved peak for one step at each batch
        c.reset_peak()
        trainer = c.rotation(f"oom-cal-{batch}", configs(1), 1, 1, {"per_device_train_batch_size": batch})
        trainer.train()
        peaks[batch] = torch.cuda.max_memory_reserved()
        del trainer
    limit = (peaks[big] + peaks[big // 2]) / 2
    total = torch.cuda.get_device_properties(0).total_memory
    c.reset_peak()
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        trainer = c.rotation("oom-retry", configs(1), 2, 1, {"per_device_train_batch_size": big}, oom_retry=True)
        trainer.train()
        (row,) = trainer.results()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    retried = row.get("oom_retry") is not None
    return {
        "ok": retried and row["status"] == "completed",
        "peaks_mib": {b: p / 2**20 for b, p in peaks.items()},
        "limit_mib": limit / 2**20,
        "status": row["status"],
        "oom_retry": row.get("oom_retry"),
        "summary": f"batch {big} capped at {limit / 2**20:.0f} MiB: retried {retried}, {row['status']}",
    }


def check_pytest(c: Check) -> dict:
    target = ["tests/test_gpu.py"] if c.opts.tiny else ["tests"]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *target]
    done = subprocess.run(command, capture_output=True, text=True, timeout=c.opts.pytest_timeout)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    return {"ok": done.returncode == 0, "returncode": done.returncode, "summary": last}


CHECKS = {
    "exactness": check_exactness,
    "offload": check_offload,
    "throughput": check_throughput,
    "memory": check_memory,
    "time_to_winner": check_time_to_winner,
    "oom_retry": check_oom_retry,
    "pytest": check_pytest,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for results.md and results.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tiny", action="store_true", help="a 0.2M-parameter model and few steps (CI on a CPU)")
    parser.add_argument("--batch", type=int, default=4, help="per-run micro-batch (default: %(default)s)")
    parser.add_argument("--oom-batch", type=int, default=64, help="the batch that runs out of memory in oom_retry")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset (default: all)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no check after this many seconds")
    parser.add_argument("--pytest-timeout", type=float, default=240)
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for a dry run)")
    names = [n for n in opts.checks.split(",") if n]
    if unknown := set(names) - set(CHECKS):
        parser.error(f"unknown checks {sorted(unknown)}; choose from {list(CHECKS)}")
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        check = Check(opts, work)
        for name in names:
            if time.perf_counter() - began > opts.budget_s:
                results[name] = {"ok": None, "summary": f"skipped: --budget-s {opts.budget_s:g} spent", "seconds": 0}
                continue
            started = time.perf_counter()
            try:
                results[name] = CHECKS[name](check)
            except Exception as error:  # recorded: the other checks still run
                results[name] = {
                    "ok": False,
                    "summary": f"{type(error).__name__}: {error}"[:300],
                    "traceback": traceback.format_exc(),
                }
            results[name]["seconds"] = time.perf_counter() - started
            print(f"[{time.perf_counter() - began:6.1f} s] {name}: {results[name]['summary']}", flush=True)
            check.reset_peak()
    device = torch.cuda.get_device_name() if check.cuda else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"Device: {device}; torch {torch.__version__}; model {check.params / 1e6:.1f}M parameters, "
        f"{'bf16' if check.cuda else 'fp32'}; batch {opts.batch}; {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| check | result | ok | seconds |",
        "|---|---|---|---|",
    ]
    mark = {True: "yes", False: "**NO**", None: "-"}
    lines += [f"| {n} | {r['summary']} | {mark[r['ok']]} | {r['seconds']:.1f} |" for n, r in results.items()]
    table = "\n".join(lines)
    summary = {
        "benchmark": "gpu_check",
        "device": device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tiny": opts.tiny,
        "parameters": check.params,
        "total_s": time.perf_counter() - began,
        "all_ok": all(r["ok"] is not False for r in results.values()),
        "results": results,
    }
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(table)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
