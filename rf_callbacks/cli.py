"""`rf-callbacks` command line: look at an experiment's output folder, offline, during training or after a crash.

```bash
rf-callbacks plot --dir out                                 # train and eval loss of every run -> out/plot.png
rf-callbacks plot --dir out --metric eval/loss -o eval.png  # one metric (transformers' or the ledger's name)
rf-callbacks results --dir out                              # leaderboard, best eval_loss first
rf-callbacks results --dir out --metric eval/mean_token_accuracy
rf-callbacks resume --dir out                               # rerun a killed experiment from its checkpoint
```

Both read `<dir>/ledger.jsonl` (and `experiment.json`, `runs/*/run.json`), never a tracking server. This module
imports nothing heavy: each subcommand imports what it needs when it runs, so commands that only talk to a running
experiment stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .control.commands import add_control_commands


def _ledger(directory: Path) -> Path:
    ledger = directory / "ledger.jsonl"
    if not ledger.is_file():
        raise SystemExit(
            f"rf-callbacks: no ledger at {ledger}; --dir must be the output_dir of an rf-callbacks experiment "
            "(the folder that holds ledger.jsonl)"
        )
    return ledger


def plot(args: argparse.Namespace) -> int:
    from .plotting import plot_ledger

    ledger = _ledger(args.dir)
    output = args.output if args.output is not None else args.dir / "plot.png"
    try:
        written = plot_ledger(ledger, output, metrics=args.metric or ("loss", "eval_loss"), title=str(args.dir))
    except ValueError as error:
        print(f"rf-callbacks: {error}", file=sys.stderr)
        return 1
    print(written)
    return 0


def results(args: argparse.Namespace) -> int:
    from .ledger import format_leaderboard, results_from_dir
    from .plotting import ledger_key

    _ledger(args.dir)
    metric = ledger_key(args.metric)
    # As `TrainingArguments.greater_is_better`: higher is better unless the metric is a loss.
    greater_is_better = args.greater_is_better if args.greater_is_better is not None else not metric.endswith("loss")
    rows = results_from_dir(args.dir, metric)
    print(format_leaderboard(rows, metric=metric, greater_is_better=greater_is_better))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rf-callbacks", description="Look at and steer rf-callbacks experiments.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plot_parser = commands.add_parser("plot", help="plot a metric of every run against step, as a PNG")
    plot_parser.add_argument("--dir", type=Path, required=True, help="the experiment's output_dir")
    plot_parser.add_argument(
        "--metric",
        action="append",
        help="metric to plot, e.g. eval/loss or eval_loss; repeat for one subplot each (default: train and eval loss)",
    )
    plot_parser.add_argument("-o", "--output", type=Path, help="the PNG to write (default: <dir>/plot.png)")
    plot_parser.set_defaults(handler=plot)

    results_parser = commands.add_parser("results", help="print the leaderboard of the experiment's runs")
    results_parser.add_argument("--dir", type=Path, required=True, help="the experiment's output_dir")
    results_parser.add_argument("--metric", default="eval_loss", help="metric to rank by (default: eval_loss)")
    order = results_parser.add_mutually_exclusive_group()
    order.add_argument(
        "--greater-is-better", action="store_true", help="rank the highest value first (default unless a loss)"
    )
    order.add_argument("--lower-is-better", dest="greater_is_better", action="store_false", help="lowest first")
    results_parser.set_defaults(handler=results, greater_is_better=None)
    add_control_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rf-callbacks` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
