"""Training: the hook that drives the layers' per-iteration state, and a DefaultTrainer subclass."""
from .hooks import SmallBNHook, check_batch_per_gpu
from .trainer import SmallBNTrainer, build_optimizer, optimizer_param_groups

__all__ = ["SmallBNHook", "SmallBNTrainer", "build_optimizer", "check_batch_per_gpu", "optimizer_param_groups"]
