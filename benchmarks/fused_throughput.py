"""Fused throughput: tokens/s summed over K runs, `RFSFTTrainer(fused=True)` vs rotation (`fused=False`) vs plain
TRL `SFTTrainer` trained once per config, one after another, in the same process.

Each (method, K) runs in its own subprocess, so its peak memory (max RSS; on CUDA the peak allocated) is its own.
Every method trains the same K configs (LoRA r 8/16 on all linear layers, four learning rates) for the same steps at
the same small per-run batch, so the tokens are the same; the time is `train()` only (model building and data
preparation excluded on every side). On a CPU in a few minutes:

    python benchmarks/fused_throughput.py                            # ~5M Llama, fp32, batch 2, K = 1 2 4 8
    python benchmarks/fused_throughput.py --ks 4 --batch 1 --repeats 3     # medians of 3 interleaved runs
    python benchmarks/fused_throughput.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --ks 4 --steps 16

The last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
METHODS = ("plain", "rotation", "fused")
CEILING = "ceiling"  # not a method: an estimate of the best fused / rotation ratio on this machine (see `ceiling`)


def configs(count: int, targets: str = "all-linear") -> list[dict]:
    from peft import LoraConfig

    ranks, rates = (8, 16), (1e-3, 4e-3, 2e-3, 5e-4)
    modules = targets if targets == "all-linear" else targets.split(",")
    return [
        {
            "name": f"c{i}",
            "peft_config": LoraConfig(r=ranks[i % 2], lora_alpha=2 * ranks[i % 2], target_modules=modules),
            "learning_rate": rates[(i // 2) % 4],
        }
        for i in range(count)
    ]


def worker(opts) -> dict:
    """Train K configs with one method; return seconds, tokens and peak memory."""
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from rf_callbacks import RFSFTTrainer
    from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets

    hf_logging.set_verbosity_error()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    tokenizer = build_tokenizer()
    train = demo_datasets()[0]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.dtype]
    work = tempfile.mkdtemp(prefix="rf-fused-bench-")

    def model():
        built = build_tiny_model(tokenizer, hidden_size=opts.hidden, num_layers=opts.layers, seed=0)
        return built.to(device=opts.device, dtype=dtype)

    def args(output_dir: str, **overrides):
        return SFTConfig(
            output_dir=output_dir,
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch,
            max_length=opts.max_length,
            logging_steps=opts.steps,
            bf16=opts.dtype == "bf16",
            gradient_checkpointing=False,
            use_cpu=opts.device == "cpu",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            **overrides,
        )

    def tokens(state) -> float:
        return max(entry.get("num_tokens", 0) for entry in state.log_history)

    cuda = opts.device == "cuda"

    cpu_seconds = 0.0

    def timed_train(trainer) -> float:
        """Seconds of `trainer.train()`, with the device's queued work included (and its CPU seconds counted)."""
        nonlocal cpu_seconds
        if cuda:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        cpu_seconds += time.process_time() - cpu_started
        return time.perf_counter() - started

    seconds, total_tokens = 0.0, 0.0
    if opts.method == CEILING:
        return ceiling(opts, model, args, train, tokenizer)
    if opts.method == "plain":
        for config in configs(opts.k, opts.targets):
            set_seed(0)
            trainer = SFTTrainer(
                model=model(),
                args=args(f"{work}/{config['name']}", learning_rate=config["learning_rate"]),
                train_dataset=train,
                processing_class=tokenizer,
                peft_config=config["peft_config"],
            )
            seconds += timed_train(trainer)
            total_tokens += tokens(trainer.state)
            del trainer
    else:
        set_seed(0)
        trainer = RFSFTTrainer(
            model=model(),
            args=args(work),
            train_dataset=train,
            processing_class=tokenizer,
            configs=configs(opts.k, opts.targets),
            num_chunks=opts.chunks,
            fused=opts.method == "fused",
            control_socket=False,
        )
        seconds = timed_train(trainer)
        total_tokens = sum(tokens(run.state) for run in trainer.runs)
        assert all(row["status"] == "completed" for row in trainer.results()), trainer.results()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / seconds,
        "tokens_per_cpu_s": total_tokens / cpu_seconds,
        "peak_bytes": peak,
    }


def ceiling(opts, model, args, train, tokenizer) -> dict:
    """What a fused round costs at least: the model's forward and backward over K copies of a micro-batch.

    The benchmark's runs all see the same micro-batches, so rotation runs TRL's training step K times over a
    micro-batch where a fused round runs one forward and backward over K copies (with K adapters instead of one).
    Measured with plain TRL and one adapter (config 0), inside real training (optimizer steps and data loading between
    the steps, as in the runs; back-to-back passes, timed before, left out what training does between them): `one` =
    the seconds of `training_step` over the benchmark's micro-batches, `cat` = the same with every micro-batch
    replaced by its K copies (the LM head scoring labelled positions only, as a fused round does). `main` turns them
    into the ceiling of fused / rotation: rotation's measured seconds `R` against `R - K * one + cat`, a fused round
    that pays for nothing but the larger forward and backward (its K adapters free, the rest of every run's step as
    rotation pays it). Still an estimate: these steps run in another process than rotation's, at another moment.
    """
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    from rf_callbacks.fused import _labelled_positions_only
    from rf_callbacks.fused_lora import concat_batches

    cuda = opts.device == "cuda"
    clock = time.perf_counter if cuda else time.process_time  # on a CPU, the CPU seconds the ratio compares
    config = configs(1, opts.targets)[0]

    class TimedSFTTrainer(SFTTrainer):
        seconds = 0.0

        def training_step(self, *step_args, **step_kwargs):
            if cuda:
                torch.cuda.synchronize()
            started = clock()
            loss = super().training_step(*step_args, **step_kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.seconds += clock() - started
            return loss

    def train_steps(copies: int) -> float:
        set_seed(0)  # the model, adapter and data order of the runs
        trainer = TimedSFTTrainer(
            model=model(),
            args=args(tempfile.mkdtemp(prefix="rf-ceiling-"), learning_rate=config["learning_rate"]),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=config["peft_config"],
        )
        head = contextlib.nullcontext()
        if copies > 1:
            collate = trainer.data_collator
            trainer.data_collator = lambda features: concat_batches([collate(features)] * copies)[0]
            head = _labelled_positions_only()  # the LM head as a fused round runs it
        with head:
            trainer.train()
        return trainer.seconds

    one, cat = train_steps(1), train_steps(opts.k)
    return {"one_seconds": one, "cat_seconds": cat, "forward_backward_ceiling": opts.k * one / cat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="per-run micro-batch")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument(
        "--targets", default="all-linear", help='LoRA target modules: "all-linear" or a comma list, e.g. q_proj,v_proj'
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="which of plain,rotation,fused,ceiling to run (ratios need their pair; ceiling: an estimate of the "
        "best fused / rotation on this machine, see `ceiling`)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of every (method, K), interleaved; the medians are reported"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (0: torch's default); 1 is steadier on a shared CPU",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--method", choices=(*METHODS, CEILING), help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.method:
        print(json.dumps(worker(opts)))
        return

    import torch

    from rf_callbacks.demo import build_tiny_model, build_tokenizer

    params = build_tiny_model(build_tokenizer(), hidden_size=opts.hidden, num_layers=opts.layers).num_parameters()
    device = torch.cuda.get_device_name() if opts.device == "cuda" else f"{platform.processor() or 'cpu'}"
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(
        f"model: Llama hidden {opts.hidden}, {opts.layers} layers, {params / 1e6:.2f}M parameters, {opts.dtype} on "
        f"{device} ({torch.get_num_threads()} threads); per-run batch {opts.batch}, {opts.steps} steps per run, "
        f"{opts.chunks} chunks"
    )
    methods = [m for m in (*METHODS, CEILING) if m in opts.methods.split(",")]
    runs: dict[str, list[dict]] = {}
    base = [sys.executable, __file__, *sys.argv[1:]]
    for _ in range(opts.repeats):  # interleaved, so that a slow spell of the machine hits every method alike
        for k in [int(k) for k in opts.ks.split(",")]:
            for method in methods:
                out = subprocess.run([*base, "--method", method, "--k", str(k)], capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{method} K={k} failed:\n{out.stderr[-3000:]}")
                runs.setdefault(f"{method}/{k}", []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    ceilings = {key: runs.pop(key) for key in list(runs) if key.startswith(CEILING)}
    results = {
        key: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in rs],
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
            "peak_bytes": max(r["peak_bytes"] for r in rs),
        }
        for key, rs in runs.items()
    }
    print(
        "\n| K | plain TRL tok/s | rotation tok/s | fused tok/s | fused / rotation (per repeat) | fused / plain "
        "| peak MiB p/r/f |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = {}

    def ratio(k: int, over: str) -> tuple[float | None, list[float]]:
        """Median ratio of fused to `over`, and the ratio within each repeat (the two ran side by side)."""
        if f"fused/{k}" not in runs or f"{over}/{k}" not in runs:
            return None, []
        pairs = [f["tokens_per_s"] / o["tokens_per_s"] for f, o in zip(runs[f"fused/{k}"], runs[f"{over}/{k}"])]
        return results[f"fused/{k}"]["tokens_per_s"] / results[f"{over}/{k}"]["tokens_per_s"], pairs

    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    for k in [int(k) for k in opts.ks.split(",")]:
        plain, rotation, fused = (results.get(f"{m}/{k}") for m in METHODS)
        (ratio_rot, pairs_rot), (ratio_plain, _) = ratio(k, "rotation"), ratio(k, "plain")
        peaks = "/".join(cell(r and r["peak_bytes"] / 2**20, ".0f") for r in (plain, rotation, fused))
        rates = " | ".join(cell(r and r["tokens_per_s"], ".0f") for r in (plain, rotation, fused))
        per_repeat = f" ({'/'.join(f'{p:.2f}' for p in pairs_rot)})" if len(pairs_rot) > 1 else ""
        print(f"| {k} | {rates} | {cell(ratio_rot, '.2f')}x{per_repeat} | {cell(ratio_plain, '.2f')}x | {peaks} |")
        cpu_ratio = None
        if fused and rotation:  # per CPU second: what a busy shared machine's time slicing leaves out of wall time
            cpu_ratio = fused["tokens_per_cpu_s"] / rotation["tokens_per_cpu_s"]
        summary[k] = {
            "fused_vs_rotation": ratio_rot and round(ratio_rot, 3),
            "fused_vs_rotation_cpu": cpu_ratio and round(cpu_ratio, 3),
            "fused_vs_rotation_repeats": [round(p, 3) for p in pairs_rot],
            "fused_vs_plain": ratio_plain and round(ratio_plain, 3),
        }
    for k, row in summary.items():
        if row["fused_vs_rotation_cpu"]:
            print(f"K={k}: fused / rotation per CPU second (medians) {row['fused_vs_rotation_cpu']:.2f}x")
        if f"{CEILING}/{k}" in ceilings:
            measured = ceilings[f"{CEILING}/{k}"]
            results[f"{CEILING}/{k}"] = measured
            row["forward_backward_ceiling"] = round(
                statistics.median(r["forward_backward_ceiling"] for r in measured), 3
            )
            line = f"forward and backward alone {row['forward_backward_ceiling']:.2f}x"
            if f"rotation/{k}" in runs:  # with rotation's measured seconds of the same repeat
                spent = "seconds" if opts.device == "cuda" else "cpu_seconds"
                row["ceiling"] = round(
                    statistics.median(
                        r[spent] / (r[spent] - k * c["one_seconds"] + c["cat_seconds"])
                        for r, c in zip(runs[f"rotation/{k}"], measured)
                    ),
                    3,
                )
                line = f"{row['ceiling']:.2f}x ({line})"
            print(
                f"K={k}: ceiling of fused / rotation on this machine {line}: one plain-TRL forward and backward over "
                f"{k} copies of each micro-batch in place of {k} over it"
            )
    print(
        json.dumps(
            {
                "benchmark": "fused_throughput",
                "device": device,
                "dtype": opts.dtype,
                "parameters": params,
                "hidden": opts.hidden,
                "layers": opts.layers,
                "targets": opts.targets,
                "threads": torch.get_num_threads(),
                "batch": opts.batch,
                "steps": opts.steps,
                "repeats": opts.repeats,
                "summary": summary,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
