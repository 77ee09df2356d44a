"""The per-iteration state driver: one object that, before each training step, tells every norm
of a model which iteration it is and, for norms whose statistics move at the learning rate, what
the learning rate is. Pure PyTorch; the detectron2 hook, the benchmarks, the studies and the
tests all use it.

A layer takes part through its methods, whatever its class:
- ``set_iteration(i)`` (CBN, MABN, BRN: burn-in, windows, warmups, clipping, ramps follow the
  trainer's iteration, resume included; a second training call in one iteration is caught);
- ``set_update_rate(r)`` (BCN: r = the current LR of the param group holding the layer's
  ``weight``, a Python float, so no host sync);
- ``set_loss_scaler(scaler)`` (MABN: the GradScaler of mixed-precision training, once).
Frozen layers are left alone.
"""
from torch import nn


class NormStateDriver:
    """``NormStateDriver(model, optimizer=None, update_rate="lr", loss_scaler=None)``; call
    ``before_step(iteration)`` before every training step.

    ``update_rate``: "lr" ties rate-driven layers to their param group's learning rate (the
    optimizer is then required); a number sets that fixed rate once; None leaves rates alone.
    ``loss_scaler``: the ``torch.amp.GradScaler`` that scales the loss, if any.
    """

    def __init__(self, model, optimizer=None, update_rate="lr", loss_scaler=None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        active = [m for m in model.modules() if not getattr(m, "frozen", False)]
        self.counters = [m for m in active if callable(getattr(m, "set_iteration", None))]
        for m in active:
            if callable(getattr(m, "set_loss_scaler", None)):
                m.set_loss_scaler(loss_scaler)
        rated = [m for m in active if callable(getattr(m, "set_update_rate", None))]
        self.rate_groups = []
        if update_rate == "lr" and rated:
            if optimizer is None:
                raise ValueError(f"{type(rated[0]).__name__} updates its statistics at the learning rate: pass the "
                                 "optimizer to NormStateDriver, or a fixed update_rate")
            group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            for m in rated:
                if id(m.weight) not in group_of:
                    raise ValueError(f"a trainable {type(m).__name__}'s weight is not in the optimizer, so its "
                                     "update rate cannot follow the learning rate")
                self.rate_groups.append((m, group_of[id(m.weight)]))
        elif update_rate not in ("lr", None):
            for m in rated:
                m.set_update_rate(float(update_rate))

    def before_step(self, iteration):
        for m in self.counters:
            m.set_iteration(iteration)
        for m, group in self.rate_groups:
            m.set_update_rate(float(group["lr"]))
