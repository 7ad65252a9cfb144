"""The CLI's control subcommands: `ls`, `stop`, `resume`, `delete`, `clone`, `watch` and `dashboard`.

`resume --dir OUT` without a run name is not an op: it reruns a killed experiment from its last checkpoint
(`resume_experiment`).

They talk to the training running in `--dir` through its control socket and import only the standard library (no
torch, transformers or TRL), so each answers in well under a second. A refusal exits non-zero with the server's
error message; a folder with no training running says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .client import NoTraining, request


def parse_assignment(text: str) -> tuple[str, Any]:
    """`learning_rate=5e-4` -> `("learning_rate", 0.0005)`; values are read as JSON when they parse, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def add_control_commands(commands: argparse._SubParsersAction) -> None:
    """Register the socket subcommands on the `rf-callbacks` parser."""

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--dir", type=Path, required=True, help="the training's output_dir")
        return parser

    command("ls", "list the runs of the training running in --dir").set_defaults(handler=run_ls)
    for op, text in (
        ("stop", "park a run at its next optimizer step (it can be resumed)"),
        (
            "resume",
            "put stopped RUN back into the rotation; without RUN, rerun a killed experiment from its checkpoint",
        ),
        ("delete", "remove a run for good and free its memory"),
    ):
        parser = command(op, text)
        parser.add_argument("run", nargs="?" if op == "resume" else None)
        parser.set_defaults(handler=run_op, op=op)
    clone = command("clone", "start a new run from a run's config, with overrides")
    clone.add_argument("run")
    clone.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=parse_assignment,
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. learning_rate=5e-4 or peft_config.r=16 (repeatable)",
    )
    clone.add_argument("--warm-start", action="store_true", help="start from the parent's adapter weights")
    clone.add_argument("--copy-optimizer", action="store_true", help="with --warm-start: copy its optimizer state")
    clone.add_argument("--name", help="the new run's name (default <run>-clone-<k>)")
    clone.set_defaults(handler=run_op, op="clone")
    watch = command("watch", "a live table of the runs, refreshed until training ends")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.set_defaults(handler=run_watch)
    dashboard = command("dashboard", "serve the local web dashboard (prints its URL with a secret token)")
    dashboard.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    dashboard.set_defaults(handler=run_dashboard)


def _ask(directory: Path, message: dict[str, Any]) -> dict[str, Any] | None:
    try:
        reply = request(directory, {**message, "by": "cli"})
    except NoTraining as error:
        hint = f"for a finished experiment use `rf-callbacks results --dir {directory}`"
        print(f"rf-callbacks: {error}; {hint}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"rf-callbacks: refused: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def resume_experiment(args: argparse.Namespace) -> int:
    """Rerun the script that wrote `<dir>/checkpoints` (same interpreter, arguments and working directory), with
    `RF_CALLBACKS_RESUME=<dir>` so that its `train()` continues from the newest checkpoint."""
    import os
    import subprocess

    from ..checkpoint import RESUME_ENV, latest_checkpoint  # torch and safetensors, but only for this command

    checkpoint = latest_checkpoint(args.dir)
    if checkpoint is None:
        print(f"rf-callbacks: no checkpoint under {args.dir / 'checkpoints'}", file=sys.stderr)
        return 1
    manifest = json.loads((checkpoint / "checkpoint.json").read_text(encoding="utf-8"))
    command, cwd = manifest["argv"], manifest["cwd"]
    script = Path(cwd) / command[1] if len(command) > 1 else None
    if script is None or script.suffix != ".py" or not script.is_file():
        print(
            f"rf-callbacks: {checkpoint} was written by {command}, not by a Python script this command can rerun; "
            "resume it with trainer.train(resume_from_checkpoint=True) in the same program",
            file=sys.stderr,
        )
        return 1
    print(f"rf-callbacks: resuming from {checkpoint}: {' '.join(command)}", flush=True)
    environment = {**os.environ, RESUME_ENV: str(args.dir.resolve())}
    return subprocess.call(command, cwd=cwd, env=environment)


def run_op(args: argparse.Namespace) -> int:
    if args.op == "resume" and args.run is None:
        return resume_experiment(args)
    message: dict[str, Any] = {"op": args.op, "run": args.run}
    if args.op == "clone":
        message.update(overrides=dict(args.overrides), warm_start=args.warm_start)
        if args.copy_optimizer:
            message["copy_optimizer"] = True
        if args.name:
            message["name"] = args.name
    reply = _ask(args.dir, message)
    if reply is None:
        return 1
    print(f"{args.op}: {reply['run']}" + (" (applied at its next step or boundary)" if args.op != "clone" else ""))
    return 0


def format_runs(rows: list[dict[str, Any]]) -> str:
    """A plain table of `ls` rows (status, steps, last losses, parent)."""

    def number(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}"

    header = ["run", "status", "step", "chunks", "train_loss", "eval_loss", "parent"]
    lines = [
        [
            row["name"],
            row["status"],
            f"{row['global_step']}/{row['max_steps']}",
            str(row["chunks_done"]),
            number(row.get("train_loss")),
            number(row.get("eval_loss")),
            row.get("parent") or "-",
        ]
        for row in rows
    ]
    widths = [max(len(title), *(len(line[i]) for line in lines)) for i, title in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *lines])


def run_ls(args: argparse.Namespace) -> int:
    reply = _ask(args.dir, {"op": "ls"})
    if reply is None:
        return 1
    print(format_runs(reply["runs"]))
    return 0


def run_watch(args: argparse.Namespace) -> int:
    seen = False
    try:
        while True:
            try:
                rows = request(args.dir, {"op": "ls", "by": "cli"})["runs"]
                status = request(args.dir, {"op": "status", "by": "cli"})
            except NoTraining as error:
                if not seen:
                    print(f"rf-callbacks: {error}", file=sys.stderr)
                    return 1
                print("training ended")
                return 0
            seen = True
            active = status.get("active") or "-"
            screen = f"{args.dir}  active: {active}  chunk: {status.get('chunk')}\n\n{format_runs(rows)}\n"
            sys.stdout.write("\x1b[2J\x1b[H" + screen if sys.stdout.isatty() else screen + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from ..dashboard.server import serve_forever

    serve_forever(args.dir, port=args.port)
    return 0
