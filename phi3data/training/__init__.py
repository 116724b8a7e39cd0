"""The phi-3 trainer: memory-mapped token data, AdamW, schedules, checkpoints, DDP / FSDP."""

from phi3data.training.trainer import TrainConfig, Trainer, TrainingDiverged, lr_at, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "lr_at", "train"]
