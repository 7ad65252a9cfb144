"""rf-callbacks: train and compare many TRL fine-tuning configs at once on one resident base model."""

from .trainers import RFSFTTrainer

__all__ = ["RFSFTTrainer"]
__version__ = "0.1.0"
