"""Fine-tuning: datasets and preprocessing, the engine (single process or DDP), its parts, run files, evaluation."""

from .engine import TrainConfig, Trainer, finetune
from .evaluate import evaluate_checkpoint
from .interrupt import RunInterrupted

__all__ = ["RunInterrupted", "TrainConfig", "Trainer", "evaluate_checkpoint", "finetune"]
