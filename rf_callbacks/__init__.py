"""rf-callbacks: train and compare many TRL fine-tuning configs at once on one resident base model.

The trainers and `Experiment` (the RapidFire AI-compatible entry point) are imported on first use, so
`rf_callbacks.demo`, `rf_callbacks.plotting` and the ledger helpers load without importing TRL (9-13 s per process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .experiment import Experiment
    from .rf_args import RFArgs
    from .trainers import RFDPOTrainer, RFGRPOTrainer, RFSFTTrainer

__all__ = ["Experiment", "RFArgs", "RFDPOTrainer", "RFGRPOTrainer", "RFSFTTrainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "RFSFTTrainer":
        from .trainers import RFSFTTrainer

        return RFSFTTrainer
    if name == "RFDPOTrainer":
        from .trainers import RFDPOTrainer

        return RFDPOTrainer
    if name == "RFGRPOTrainer":
        from .trainers import RFGRPOTrainer

        return RFGRPOTrainer
    if name == "RFArgs":
        from .rf_args import RFArgs

        return RFArgs
    if name == "Experiment":
        from .experiment import Experiment

        return Experiment
    raise AttributeError(f"module 'rf_callbacks' has no attribute {name!r}")
