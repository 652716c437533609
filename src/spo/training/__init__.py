"""The training loops on accelerate (``spo train``'s SPO trainer and ``spo train-spm``'s SPM
trainer, one set-up: :mod:`.setup`), with atomic checkpoints and exact resume."""

from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from .distributed import WriteError
from .metrics import read_metrics
from .spm_trainer import SPMTrainer, SPMTrainingError, SPMTrainResult, noised_x0_images, warmup_decay_factor
from .trainer import SPOTrainer, TrainingError, TrainResult, build_scorer

__all__ = [
    "CheckpointError",
    "SPMTrainResult",
    "SPMTrainer",
    "SPMTrainingError",
    "SPOTrainer",
    "TrainResult",
    "TrainingError",
    "WriteError",
    "build_scorer",
    "latest_checkpoint",
    "list_checkpoints",
    "noised_x0_images",
    "read_metrics",
    "warmup_decay_factor",
]
