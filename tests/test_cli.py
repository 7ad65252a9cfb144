"""The `rf-callbacks` command on the output folder of a real (tiny) training, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cpu_sft_config
from peft import LoraConfig
from transformers import set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger
from rf_callbacks.plotting import ledger_figure

REPO = Path(__file__).resolve().parents[1]


def rf_callbacks(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rf_callbacks.cli", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def experiment(tokenizer, chat_data, tmp_path_factory) -> Path:
    """An output folder with runs `slow` and `fast` (lr 1e-3 and 1e-2), 6 steps each over 2 chunks."""
    out = tmp_path_factory.mktemp("cli") / "out"
    set_seed(0)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_sft_config(out, max_steps=6),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[
            {"name": "slow", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
            {"name": "fast", "peft_config": LoraConfig(r=4, target_modules=["q_proj"]), "learning_rate": 1e-2},
        ],
        num_chunks=2,
    )
    trainer.train()
    return out


@pytest.fixture(scope="module")
def chunked(tokenizer, chat_data, tmp_path_factory) -> Path:
    """An output folder with chunks of 3 steps and a log every 2: run `long` (8 steps) ends mid-chunk, run `short`
    (6 steps) at a chunk's end."""
    out = tmp_path_factory.mktemp("cli-chunks") / "out"
    set_seed(0)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_sft_config(out, max_steps=8, logging_steps=2),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[
            {"name": "long", "peft_config": LoraConfig(r=4, target_modules=["q_proj"])},
            {"name": "short", "peft_config": LoraConfig(r=4, target_modules=["q_proj"]), "max_steps": 6},
        ],
        num_chunks=8,  # 96 rows / batch 4 = 24 steps per epoch
    )
    trainer.train()
    return out


def leaderboard_runs(stdout: str) -> list[str]:
    """Run names of a leaderboard, in rank order (lines after the header and its dashes)."""
    return [line.split()[1] for line in stdout.strip().splitlines()[2:]]


def test_plot_writes_a_png(experiment, tmp_path):
    png = tmp_path / "eval.png"
    result = rf_callbacks("plot", "--dir", experiment, "--metric", "eval/loss", "-o", png)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000

    result = rf_callbacks("plot", "--dir", experiment)  # default: train and eval loss, in <dir>/plot.png
    assert result.returncode == 0, result.stderr
    assert (experiment / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_ledgers_boundaries(chunked):
    """The dotted lines sit at the ledger's `boundary` events: not at the next log (4 and 8, `logging_steps` late), and
    not at a run's end (6 for `short`, whose last chunk ends there; 8 for `long`)."""
    expected: dict[str, set[float]] = {}
    for record in read_ledger(chunked / "ledger.jsonl"):
        if record["event"] == "boundary":
            expected.setdefault(record["run"], set()).add(record["step"])
    assert expected == {"long": {3, 6}, "short": {3}}

    fig = ledger_figure(chunked / "ledger.jsonl", metrics=("loss", "eval_loss"))
    assert len(fig.axes) == 2
    for ax in fig.axes:
        run_of = {line.get_color(): line.get_label() for line in ax.lines if line.get_linestyle() != ":"}
        assert set(run_of.values()) == {"long", "short"}
        drawn: dict[str, set[float]] = {}
        for line in ax.lines:
            if line.get_linestyle() == ":":
                start, end = line.get_xdata()
                assert start == end  # vertical
                drawn.setdefault(run_of[line.get_color()], set()).add(start)
        assert drawn == expected, ax.get_ylabel()


def test_results_ranks_runs_by_the_metric(experiment):
    rows = {row["name"]: row for row in map(json.loads, map(Path.read_text, experiment.glob("runs/*/run.json")))}
    by_eval_loss = sorted(rows, key=lambda name: rows[name]["eval_loss"])

    result = rf_callbacks("results", "--dir", experiment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:6] == ["rank", "run", "status", "step", "train_loss", "eval_loss"]
    assert leaderboard_runs(result.stdout) == by_eval_loss
    for name in rows:
        assert f"{rows[name]['eval_loss']:.4f}" in next(line for line in result.stdout.splitlines() if name in line)

    # transformers' name works too, and the order flips on request
    result = rf_callbacks("results", "--dir", experiment, "--metric", "eval/loss", "--greater-is-better")
    assert leaderboard_runs(result.stdout) == by_eval_loss[::-1]


def test_results_after_a_crash(experiment, tmp_path):
    """Without any run.json and with the ledger's last line cut short, the ledger alone still gives the table."""
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(experiment / "ledger.jsonl", crashed / "ledger.jsonl")
    with open(crashed / "ledger.jsonl", "a", encoding="utf-8") as ledger:
        ledger.write('{"time": 1, "run": "slow", "step": 7, "ev')
    result = rf_callbacks("results", "--dir", crashed)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line.split() for line in result.stdout.strip().splitlines()[2:]}
    assert set(lines) == {"slow", "fast"}
    assert all(line[2] == "completed" and line[3] == "6/?" for line in lines.values())


def test_clear_errors(experiment, tmp_path):
    result = rf_callbacks("results", "--dir", tmp_path)
    assert result.returncode != 0 and "no ledger at" in result.stderr

    result = rf_callbacks("plot", "--dir", experiment, "--metric", "eval/bleu")
    assert result.returncode == 1
    assert "no values for any of the metrics ['eval/bleu']" in result.stderr and "eval_loss" in result.stderr


def test_cli_does_not_import_torch(experiment):
    """Reading an output folder must not pay for torch, transformers or TRL (seconds per process)."""
    code = (
        "import sys; from rf_callbacks.cli import main; main(['results', '--dir', sys.argv[1]]); "
        "heavy = {'torch', 'transformers', 'trl', 'peft'} & set(sys.modules); assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(experiment)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
