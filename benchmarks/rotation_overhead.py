"""Rotation overhead: 4 LoRA configs x 8 chunks through `RFSFTTrainer` vs the same 4 configs one after another with
plain `SFTTrainer` in the same process (each loading the model from disk, as a user's loop would). `--trainer dpo`
and `--trainer grpo` compare `RFDPOTrainer`/`RFGRPOTrainer` with plain `DPOTrainer`/`GRPOTrainer` the same way
(bundled preference pairs; numeric prompts with a verifiable reward).

Reports the wall-time ratio, the time spent swapping runs at a boundary as a share of the chunk's training time, and
the peak RSS of 1 vs 8 configs (each measured in its own subprocess). Runs on a CPU in a few minutes:

    python benchmarks/rotation_overhead.py                     # defaults below
    python benchmarks/rotation_overhead.py --hidden 512 --layers 8
    python benchmarks/rotation_overhead.py --trainer dpo --steps 32 --skip-rss
    python benchmarks/rotation_overhead.py --trainer grpo --steps 16 --skip-rss
    python benchmarks/rotation_overhead.py --fused --skip-rss            # RFSFTTrainer(fused=True)

Neither side evaluates (no eval set): this measures training plus the cost of rotating, not evaluation. The last line
of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from rf_callbacks import RFDPOTrainer, RFGRPOTrainer, RFSFTTrainer  # noqa: E402
from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets, load_instructions  # noqa: E402
from rf_callbacks.engine import MultiConfigMixin  # noqa: E402
from rf_callbacks.preference import load_preferences  # noqa: E402

hf_logging.set_verbosity_error()


def configs(count: int) -> list[dict]:
    ranks, rates = (4, 16), (1e-3, 4e-3, 2e-3, 5e-4)
    return [
        {
            "name": f"c{i}",
            "peft_config": LoraConfig(r=ranks[i % 2], lora_alpha=2 * ranks[i % 2], target_modules="all-linear"),
            "learning_rate": rates[(i // 2) % 4],
        }
        for i in range(count)
    ]


NUMBER = re.compile(r"-?\d+")


def says_a_number(completions, **kwargs) -> list[float]:
    """A verifiable format reward: 1 when the completion holds a number."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if NUMBER.search(text) else 0.0 for text in texts]


def numeric_prompts():
    from datasets import Dataset

    rows = [
        {"prompt": [{"role": "user", "content": row["instruction"]}]}
        for row in load_instructions()
        if NUMBER.search(row["response"]) and NUMBER.search(row["instruction"])
    ]
    return Dataset.from_list(rows)


# Per trainer: (config class, plain trainer, rf trainer, train data, extra trainer kwargs, extra config fields)
TRAINERS = {
    "sft": (SFTConfig, SFTTrainer, RFSFTTrainer, lambda: demo_datasets()[0], {}, {}),
    "dpo": (DPOConfig, DPOTrainer, RFDPOTrainer, load_preferences, {}, {}),
    "grpo": (
        GRPOConfig,
        GRPOTrainer,
        RFGRPOTrainer,
        numeric_prompts,
        {"reward_funcs": [says_a_number]},
        {"num_generations": 4, "max_completion_length": 16, "steps_per_generation": 2},
    ),
}
KIND = "sft"
FUSED = False  # --fused: RFSFTTrainer(fused=True)


def sft_args(output_dir: str, max_steps: int, batch_size: int, **overrides):
    config_class, *_, extra_fields = TRAINERS[KIND]
    return config_class(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        logging_steps=10,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra_fields,
        **overrides,
    )


PLAIN_SETUP: list[float] = []  # per config: model load + SFTTrainer construction (tokenization included)


def run_plain(model_dir: str, tokenizer, train, work: str, steps: int, batch: int, count: int) -> float:
    started = time.perf_counter()
    for config in configs(count):
        set_seed(0)
        setup_started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        plain_class, extra = TRAINERS[KIND][1], TRAINERS[KIND][4]
        trainer = plain_class(
            model=model,
            args=sft_args(f"{work}/plain-{config['name']}", steps, batch, learning_rate=config["learning_rate"]),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=config["peft_config"],
            **extra,
        )
        PLAIN_SETUP.append(time.perf_counter() - setup_started)
        trainer.train()
        trainer.save_model()
    return time.perf_counter() - started


class SwapTimer:
    """Times `_activate` (park the previous run + bring in the next) and the training of each slice."""

    def __init__(self):
        self.swaps: list[float] = []
        self.setups: list[float] = []
        self.slices: list[float] = []

    def install(self):
        activate, train_steps = MultiConfigMixin._activate, MultiConfigMixin._train_steps
        timer = self

        def timed_activate(trainer, run):
            if trainer._rf_active is run:  # already active: nothing to swap
                return activate(trainer, run)
            first = not run.attributes
            started = time.perf_counter()
            activate(trainer, run)
            (timer.setups if first else timer.swaps).append(time.perf_counter() - started)

        def timed_train_steps(trainer, *args, **kwargs):  # a generator: timed from its first step to its return
            steps = train_steps(trainer, *args, **kwargs)
            started = time.perf_counter()
            result = yield from steps
            timer.slices.append(time.perf_counter() - started)
            return result

        MultiConfigMixin._activate = timed_activate
        MultiConfigMixin._train_steps = timed_train_steps


def run_rotation(model_dir: str, tokenizer, train, work: str, steps: int, batch: int, count: int, chunks: int):
    started = time.perf_counter()
    set_seed(0)
    rf_class, extra = TRAINERS[KIND][2], TRAINERS[KIND][4]
    trainer = rf_class(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=sft_args(f"{work}/rotation-{count}", steps, batch, learning_rate=1e-3),
        train_dataset=train,
        processing_class=tokenizer,
        configs=configs(count),
        num_chunks=chunks,
        **extra,
        **({"fused": True} if FUSED else {}),
    )
    trainer.train()
    return time.perf_counter() - started, trainer


def peak_rss_child(args) -> None:
    """Subprocess entry: train `args.rss_child` configs and print this process's peak RSS in MiB."""
    global KIND
    KIND = args.trainer
    tokenizer = build_tokenizer()
    train = TRAINERS[KIND][3]()
    with tempfile.TemporaryDirectory() as work:
        run_rotation(args.model_dir, tokenizer, train, work, args.steps, args.batch, args.rss_child, args.chunks)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_rss(args, count: int) -> float:
    command = [sys.executable, __file__, "--rss-child", str(count), "--model-dir", args.model_dir]
    command += ["--steps", str(max(args.steps // 4, args.chunks)), "--batch", str(args.batch)]
    command += ["--chunks", str(args.chunks), "--trainer", args.trainer]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--configs", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=58, help="optimizer steps per config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating plain/rotation pairs; medians reported")
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="sft")
    parser.add_argument("--fused", action="store_true", help="RFSFTTrainer(fused=True): runs share each forward")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 1 vs 8 configs peak-RSS subprocesses")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args)

    global KIND, FUSED
    KIND, FUSED = args.trainer, args.fused
    if FUSED and KIND != "sft":
        parser.error("--fused is for --trainer sft")
    tokenizer = build_tokenizer()
    train = TRAINERS[KIND][3]()
    with tempfile.TemporaryDirectory() as work:
        model = build_tiny_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers)
        params = sum(p.numel() for p in model.parameters())
        args.model_dir = f"{work}/base"
        model.save_pretrained(args.model_dir)
        del model

        # Warm both code paths once (kernels, allocator) so neither side pays first-call costs in the measurement.
        run_plain(args.model_dir, tokenizer, train, work, 2, args.batch, 1)
        run_rotation(args.model_dir, tokenizer, train, work, args.chunks, args.batch, 1, args.chunks)

        timer = SwapTimer()
        timer.install()
        plain_times, rotation_times = [], []
        PLAIN_SETUP.clear()
        for _ in range(args.repeats):
            plain_times.append(run_plain(args.model_dir, tokenizer, train, work, args.steps, args.batch, args.configs))
            rotation_s, trainer = run_rotation(
                args.model_dir, tokenizer, train, work, args.steps, args.batch, args.configs, args.chunks
            )
            rotation_times.append(rotation_s)
        plain_s, rotation_s = statistics.median(plain_times), statistics.median(rotation_times)
        rss_1 = rss_8 = None
        if not args.skip_rss:
            rss_1, rss_8 = measure_rss(args, 1), measure_rss(args, 8)

    swap_ms = 1000 * sum(timer.swaps) / max(len(timer.swaps), 1)
    slice_ms = 1000 * sum(timer.slices) / max(len(timer.slices), 1)
    result = {
        "benchmark": "rotation_overhead",
        "trainer": args.trainer,
        "fused": args.fused,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model_params": params,
        "configs": args.configs,
        "num_chunks": args.chunks,
        "steps_per_config": args.steps,
        "batch_size": args.batch,
        "plain_sequential_s": round(plain_s, 2),
        "rotation_s": round(rotation_s, 2),
        "plain_runs_s": [round(t, 2) for t in plain_times],
        "rotation_runs_s": [round(t, 2) for t in rotation_times],
        "wall_ratio": round(rotation_s / plain_s, 3),
        "plain_setup_per_config_s": round(statistics.median(PLAIN_SETUP), 3),
        "swaps": len(timer.swaps),
        "swap_ms": round(swap_ms, 3),
        "slice_ms": round(slice_ms, 1),
        "swap_pct_of_chunk": round(100 * swap_ms / slice_ms, 3),
        "first_activation_ms": round(1000 * sum(timer.setups) / max(len(timer.setups), 1), 2),
        "peak_rss_1_config_mib": rss_1 and round(rss_1, 1),
        "peak_rss_8_configs_mib": rss_8 and round(rss_8, 1),
        "rss_ratio_8_vs_1": rss_1 and round(rss_8 / rss_1, 3),
        "all_completed": all(row["status"] == "completed" for row in trainer.results()),
    }
    rows = [
        (f"plain {TRAINERS[KIND][1].__name__}, configs one after another (median)", f"{plain_s:.2f} s"),
        (
            f"{TRAINERS[KIND][2].__name__}, {args.configs} configs x {args.chunks} chunks (median)",
            f"{rotation_s:.2f} s",
        ),
        ("wall ratio (target <= 0.9)", f"{result['wall_ratio']:.3f}"),
        ("plain: model load + trainer setup per config", f"{result['plain_setup_per_config_s']:.2f} s"),
        (f"swap per boundary ({len(timer.swaps)} swaps)", f"{swap_ms:.2f} ms"),
        ("training time per (run, chunk) slice", f"{slice_ms:.1f} ms"),
        ("swap as % of chunk time (target <= 1%)", f"{result['swap_pct_of_chunk']:.3f} %"),
    ]
    if rss_1 is not None:
        rows += [
            ("peak RSS, 1 config", f"{rss_1:.0f} MiB"),
            ("peak RSS, 8 configs", f"{rss_8:.0f} MiB"),
            ("RSS ratio 8 vs 1 (target <= 1.2)", f"{result['rss_ratio_8_vs_1']:.3f}"),
        ]
    width = max(len(label) for label, _ in rows)
    print(f"model: {params / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers), fp32, CPU")
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    print(json.dumps(result))
    return None


if __name__ == "__main__":
    main()
