"""Data bundled with rf-callbacks: `instructions.jsonl` (see `make_instructions.py`, which generates it)."""
