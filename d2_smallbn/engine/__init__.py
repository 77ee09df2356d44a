"""Training: the hook that drives the layers' per-iteration state, a DefaultTrainer subclass, the
optimizer's norm-parameter rule, and (``engine.lazy``) the LazyConfig entry point."""
from .hooks import SmallBNHook, check_batch_per_gpu
from .trainer import SmallBNTrainer, build_optimizer, get_optimizer_params, optimizer_param_groups

__all__ = ["SmallBNHook", "SmallBNTrainer", "build_optimizer", "check_batch_per_gpu", "get_optimizer_params",
           "optimizer_param_groups"]
