"""The SPO training loop on accelerate, with atomic checkpoints and exact resume."""

from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from .distributed import WriteError
from .metrics import read_metrics
from .trainer import SPOTrainer, TrainingError, TrainResult, build_scorer

__all__ = [
    "CheckpointError",
    "SPOTrainer",
    "TrainResult",
    "TrainingError",
    "WriteError",
    "build_scorer",
    "latest_checkpoint",
    "list_checkpoints",
    "read_metrics",
]
