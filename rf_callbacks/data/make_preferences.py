"""Generate `preferences.jsonl`, the small preference set bundled with rf-callbacks (for `RFDPOTrainer`).

Every row is `{"prompt": ..., "chosen": ..., "rejected": ...}`, built from one row of `instructions.jsonl`: `chosen` is
its correct response, `rejected` the same response with the answer corrupted (a number changed, a quoted word
scrambled, or the last word replaced), so the pair differs only where the answer is wrong.

The output is a pure function of `instructions.jsonl`, `random.Random(0)` and this file (stdlib only): running
`python make_preferences.py` rewrites the JSONL byte-identically.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

if __package__:
    from .make_instructions import write_jsonl
else:  # run as a script: `python make_preferences.py`
    from make_instructions import write_jsonl

SOURCE = Path(__file__).with_name("instructions.jsonl")
OUTPUT = Path(__file__).with_name("preferences.jsonl")
FILLERS = ["purple", "seven", "river", "Tuesday", "quickly", "giraffe", "empty", "twelve", "north", "paper"]


def corrupt(response: str, rng: random.Random) -> str:
    """A wrong variant of `response` that keeps its wording: change a number, scramble a quoted word, or swap the
    last word."""
    numbers = list(re.finditer(r"\d+", response))
    if numbers:
        match = numbers[-1]
        value = int(match.group())
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        wrong = wrong if wrong >= 0 and wrong != value else value + 1
        return response[: match.start()] + str(wrong) + response[match.end() :]
    quoted = list(re.finditer(r'"([^"]{2,})"', response))
    if quoted:
        match = quoted[-1]
        word = match.group(1)
        letters = list(word)
        for _ in range(10):
            rng.shuffle(letters)
            if "".join(letters) != word:
                break
        scrambled = "".join(letters) if "".join(letters) != word else word[::-1] + "s"
        return response[: match.start(1)] + scrambled + response[match.end(1) :]
    words = re.finditer(r"[A-Za-z]+", response)
    last = list(words)[-1]
    filler = rng.choice([word for word in FILLERS if word != last.group()])
    return response[: last.start()] + filler + response[last.end() :]


def generate(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    with open(SOURCE, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            rejected = corrupt(row["response"], rng)
            if rejected != row["response"]:
                rows.append({"prompt": row["instruction"], "chosen": row["response"], "rejected": rejected})
    return rows


def main(argv: list[str]) -> None:
    write_jsonl(generate(), Path(argv[1]) if len(argv) > 1 else OUTPUT)


if __name__ == "__main__":
    main(sys.argv)
