"""Multi-process scaling: the same experiment (K LoRA configs x C chunks through `RFSFTTrainer`) launched with
`accelerate launch --num_processes 1` and with N processes (`parallel="configs"`: runs spread over the processes).
Reports configs per hour of wall time (training only: from `train()` called to returned, on rank 0, after the model
is built) and the speed-up of N processes over 1.

N comes from the environment, so the script runs unchanged on a multi-GPU machine: `RF_BENCH_PROCESSES` if set, else
the number of CUDA devices when there are 2 or more, else 2 CPU processes (gloo; each process gets
`OMP_NUM_THREADS = cores // N`, the 1-process side gets every core). On GPUs each process trains on its own device.

    python benchmarks/multi_process_scaling.py                   # defaults below
    RF_BENCH_PROCESSES=8 python benchmarks/multi_process_scaling.py --configs 16 --hidden 512 --layers 8

The last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _processes() -> tuple[int, str]:
    if os.environ.get("RF_BENCH_PROCESSES"):
        return int(os.environ["RF_BENCH_PROCESSES"]), "RF_BENCH_PROCESSES"
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        return torch.cuda.device_count(), "cuda devices"
    return 2, "default (CPU)"


def worker(options) -> None:
    """One experiment under `accelerate launch`; rank 0 writes its timing to `options.result`."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig

    from rf_callbacks import RFSFTTrainer
    from rf_callbacks.demo import build_tiny_model, build_tokenizer, demo_datasets

    hf_logging.set_verbosity_error()
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, hidden_size=options.hidden, num_layers=options.layers)
    train, _ = demo_datasets()
    cpu = not torch.cuda.is_available()
    configs = [
        {"name": f"c{i}", "peft_config": LoraConfig(r=4 * (1 + i % 2), lora_alpha=16, target_modules="all-linear"),
         "learning_rate": 1e-3 * (1 + i % 4)}
        for i in range(options.configs)
    ]  # fmt: skip
    args = SFTConfig(
        output_dir=options.out, per_device_train_batch_size=options.batch, max_steps=options.steps, logging_steps=10,
        bf16=False, gradient_checkpointing=False, report_to="none", use_cpu=cpu, disable_tqdm=True,
        save_strategy="no", seed=0, max_length=128,
    )  # fmt: skip
    trainer = RFSFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, configs=configs,
        num_chunks=options.chunks, control_socket=False, parallel="configs",
    )  # fmt: skip
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    if trainer.args.process_index == 0:
        coordination = trainer._rf_dist
        result = {
            "seconds": seconds,
            "completed": sum(row["status"] == "completed" for row in trainer.results()),
            "migrations": coordination.migrations if coordination else 0,
            "rounds": coordination.rounds if coordination else None,
            "params": model.num_parameters(),
        }
        Path(options.result).write_text(json.dumps(result), encoding="utf-8")
    trainer.close()


def launch(processes: int, options, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rf-scaling-") as folder:
        result = Path(folder) / "result.json"
        path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
        accelerate = Path(sys.executable).with_name("accelerate")
        # `--multi_gpu` also on a CPU (the worker's arguments say use_cpu=True): accelerate 1.15's `--cpu` starts one
        command = [str(accelerate), "launch", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        if processes > 1:
            command.append("--multi_gpu")
        command += [__file__, "--worker", "--out", str(Path(folder) / "out"), "--result", str(result)]
        for name in ("configs", "chunks", "steps", "batch", "hidden", "layers"):
            command += [f"--{name}", str(getattr(options, name))]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            sys.exit(f"accelerate launch failed ({processes} processes):\n{tail}")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    import torch

    processes, source = _processes()
    options.cpu = not torch.cuda.is_available()
    cores = os.cpu_count() or 1
    one = launch(1, options, cores if options.cpu else 1)
    many = launch(processes, options, max(1, cores // processes) if options.cpu else 1)
    rate = {n: r["completed"] / r["seconds"] * 3600 for n, r in ((1, one), (processes, many))}
    speedup = one["seconds"] / many["seconds"]
    device = f"{cores} CPU cores" if options.cpu else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    print(f"{options.configs} configs x {options.chunks} chunks, {options.steps} steps each, batch {options.batch}, "
          f"model {one['params'] / 1e6:.2f}M parameters, {device}; processes: {processes} ({source})")  # fmt: skip
    print("| processes | train wall time | configs / hour | speed-up |")
    print("|---|---|---|---|")
    print(f"| 1 | {one['seconds']:.2f} s | {rate[1]:.0f} | 1.00x |")
    print(f"| {processes} | {many['seconds']:.2f} s | {rate[processes]:.0f} | {speedup:.2f}x |")
    summary = {
        "benchmark": "multi_process_scaling",
        "machine": f"{platform.machine()}, {device}, torch {torch.__version__}",
        "processes": processes,
        "processes_from": source,
        "configs": options.configs,
        "num_chunks": options.chunks,
        "steps_per_config": options.steps,
        "batch_size": options.batch,
        "model_params": one["params"],
        "one_process_s": round(one["seconds"], 2),
        "n_processes_s": round(many["seconds"], 2),
        "configs_per_hour_1": round(rate[1], 1),
        "configs_per_hour_n": round(rate[processes], 1),
        "speedup": round(speedup, 3),
        "migrations": many["migrations"],
        "all_completed": one["completed"] == many["completed"] == options.configs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
