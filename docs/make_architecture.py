"""Draw `docs/architecture.png`: the parts of the rf-callbacks engine and how data and control flow between them.

    python docs/make_architecture.py [output.png]

Boxes are the engine's parts (what a maintainer changes), arrows say what flows. Kept as code so the picture is
redrawn, not edited, when a part moves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# Colours by role: the TRL side, the loop and its state, what it writes, how people steer it.
TRL, LOOP, STATE, RECORDS, CONTROL, DIST = "#fde2c4", "#cfe3ff", "#dff3d8", "#f3e0f7", "#fff4b3", "#e4e4e4"

# name: (x, y, width, height, colour, title, subtitle). Coordinates in a 16 x 10 canvas.
BOXES = {
    "trl": (
        0.3,
        7.6,
        3.9,
        1.9,
        TRL,
        "TRL trainer",
        "SFT / DPO / GRPOTrainer\ntraining_step, loss,\ncallbacks, logging",
    ),
    "trainer": (
        4.7,
        7.6,
        4.6,
        1.9,
        LOOP,
        "RF*Trainer",
        "engine over the TRL parent\nconfigs -> runs -> adapters\nno configs: the parent (drop-in)",
    ),
    "dist": (
        9.9,
        7.6,
        5.8,
        1.9,
        DIST,
        "distributed",
        "accelerate launch: rounds of slices;\nrank 0 holds ops, policies, records;\nruns move between ranks",
    ),
    "coord": (
        0.3,
        4.5,
        3.4,
        2.1,
        LOOP,
        "coordinator",
        "Coordinator of Runs:\nnext (run, slice), frontier;\nRun.record()",
    ),
    "loop": (
        4.7,
        4.5,
        4.6,
        2.1,
        LOOP,
        "rotation loop",
        "_inner_training_loop\nstep generator _train_steps\n(one run, or FusedRounds)",
    ),
    "parking": (9.9, 4.5, 2.7, 2.1, STATE, "parking", "a run's optimizer,\nscheduler, RNG, state\nswapped in and out"),
    "ckpt": (13.1, 4.5, 2.6, 2.1, STATE, "checkpoint", "Checkpointer: due?\natomic, at\nboundaries; resume"),
    "ops": (
        0.3,
        1.0,
        3.4,
        2.2,
        CONTROL,
        "IC ops + policies",
        "OpQueue -> OpApplier:\nstop / resume / delete /\nclone; PolicySet.ask",
    ),
    "socket": (4.3, 1.0, 2.9, 2.2, CONTROL, "control socket", "control.sock (0600)\nCLI: rf-callbacks"),
    "dash": (7.8, 1.0, 2.6, 2.2, CONTROL, "dashboard", "127.0.0.1 + token\ncurves, buttons"),
    "records": (
        11.0,
        1.0,
        4.7,
        2.2,
        RECORDS,
        "Records: ledger + reporters",
        "ledger.jsonl, run.json, experiment.json\nMLflow / TensorBoard / W&B / Trackio",
    ),
}

# (from, to, label, bend, both ways): what flows along each arrow.
ARROWS = [
    ("trainer", "trl", "is a", 0.0, False),
    ("trainer", "loop", "train()", 0.0, False),
    ("loop", "trl", "training_step\nper micro-batch", 0.25, False),
    ("loop", "coord", "which run\nnext?", 0.0, False),
    ("loop", "parking", "swap at\nboundary", 0.0, False),
    ("parking", "ckpt", "state", 0.0, False),
    ("dist", "loop", "rounds", 0.0, False),
    ("dist", "ckpt", "moves runs with\nits writer/reader", 0.0, False),
    ("loop", "records", "logs, status", -0.25, False),
    ("socket", "ops", "request", 0.0, False),
    ("dash", "socket", "op", 0.0, False),
    ("ops", "loop", "ops applied; policies\nasked at boundaries", 0.0, True),
]


def centre(name: str) -> tuple[float, float]:
    x, y, w, h, *_ = BOXES[name]
    return x + w / 2, y + h / 2


def edge_point(name: str, towards: tuple[float, float]) -> tuple[float, float]:
    """Where the line from the box's centre to `towards` leaves the box (so arrow heads sit on the border)."""
    x, y, w, h, *_ = BOXES[name]
    cx, cy = centre(name)
    dx, dy = towards[0] - cx, towards[1] - cy
    scale = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return cx + dx * scale, cy + dy * scale


def draw(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(16, 10), dpi=100)
    ax.set_xlim(0, 16)
    ax.set_ylim(0.8, 9.8)
    ax.axis("off")
    for x, y, w, h, colour, title, subtitle in BOXES.values():
        ax.add_patch(
            FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.15", fc=colour, ec="#444", lw=1.4)
        )
        ax.text(x + w / 2, y + h - 0.38, title, ha="center", va="center", fontsize=14, weight="bold")
        ax.text(x + w / 2, y + (h - 0.6) / 2, subtitle, ha="center", va="center", fontsize=10.5, linespacing=1.4)
    for source, target, label, bend, both in ARROWS:
        start = edge_point(source, centre(target))
        end = edge_point(target, centre(source))
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="<|-|>" if both else "-|>",
                mutation_scale=18,
                lw=1.6,
                color="#333",
                connectionstyle=f"arc3,rad={bend}",
                shrinkA=2,
                shrinkB=2,
            )
        )
        # the label sits on the curve's midpoint: for matplotlib's arc3, the chord's midpoint + rad/2 x (dy, -dx)
        dx, dy = end[0] - start[0], end[1] - start[1]
        mx, my = (start[0] + end[0]) / 2 + bend / 2 * dy, (start[1] + end[1]) / 2 - bend / 2 * dx
        if abs(dy) < 0.3:  # a short horizontal arrow: the label goes above it, not over it
            my += 0.12
        ax.text(
            mx,
            my,
            label,
            ha="center",
            va="bottom" if abs(dy) < 0.3 else "center",
            fontsize=9.5,
            style="italic",
            color="#222",
            bbox={"fc": "white", "ec": "none", "alpha": 0.9, "pad": 1.5},
        )
    ax.set_title("rf-callbacks: one TRL trainer, many runs", fontsize=17, weight="bold", pad=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("architecture.png")))
