"""The phi-3 trainer: AdamW, schedules, checkpoints, DDP / FSDP (its token reader is phi3data.tokenization.dataset)."""

from phi3data.training.trainer import TrainConfig, Trainer, TrainingDiverged, lr_at, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "lr_at", "train"]
