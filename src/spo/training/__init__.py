"""The SPO training loop on accelerate, with atomic checkpoints and exact resume."""

from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from .metrics import read_metrics
from .trainer import SPOTrainer, TrainingError, TrainResult, build_scorer

__all__ = [
    "CheckpointError",
    "SPOTrainer",
    "TrainResult",
    "TrainingError",
    "build_scorer",
    "latest_checkpoint",
    "list_checkpoints",
    "read_metrics",
]
