"""The statistics error: how far the statistics each norm normalized with are from the whole batch's.

With G processes of n images each (the papers' G GPUs), SyncBN normalizes every layer with the mean
and variance over all G*n images. Per-GPU BN uses each process's own n; CBN a compensated window of
past iterations; MABN moving averages; BRN renormalized batch statistics; BCN its running
estimates. Each paper's mechanism is a claim that its statistics are closer to the whole batch's
than per-GPU BN's. This measures it in the run, at a few layers, per channel c:

    mean error   = |mean_used - mean_all| / sqrt(var_all + eps)
    var error    = |var_used - var_all| / (var_all + eps)
    sqmean error = |(var_used + mean_used^2) - (var_all + mean_all^2)| / (var_all + mean_all^2 + eps)

averaged over channels, then over processes. ``mean_all``/``var_all`` come from every process's
per-channel sums (gathered); ``mean_used``/``var_used`` from ``d2_smallbn.layers.statistics``. MABN
normalizes by the second moment without subtracting a mean, so its mean_used is 0 and its var_used
is its moving average of x^2 over r^2: its errors are those of the normalization it applies, as for
the others; its sqmean error is that of its own estimate of the second moment E[x^2] (for the
others, of the second moment their mean and variance imply). GN and frozen norms use no batch
statistics and are not measured.
"""
import logging
import math
from functools import partial

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..layers.statistics import normalizing_statistics
from ..norms import spec_of

logger = logging.getLogger(__name__)

# label -> module name in detectron2's R-FPN Mask R-CNN: the stem, a mid backbone block, the FPN, the box head
ERRORS = ("mean", "var", "sqmean")
LAYERS = {"stem": "backbone.bottom_up.stem.conv1.norm", "res3": "backbone.bottom_up.res3.0.conv1.norm",
          "fpn": "backbone.fpn_output3.norm", "box_head": "roi_heads.box_head.conv1.norm"}


def uses_batch_statistics(module):
    """Whether ``module`` is a norm that normalizes with batch statistics in training (torch's BN and
    its subclasses such as naiveSyncBN, and this project's norms unless frozen)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return spec_of(module) is not None and not getattr(module, "frozen", False)


class StatisticsError:
    """``StatisticsError(model, layers)``: measures the statistics error at ``layers`` ({label: module
    name}; names absent from the model or not batch-statistics norms are skipped, see ``skipped``).

    ``armed = True`` makes each layer record its next training forward; ``measure()`` (collective:
    every process calls it) returns {label: {"mean": error, "var": error, "sqmean": error}} for the layers recorded on
    every process, and disarms.
    """

    def __init__(self, model, layers=None):
        modules = dict(model.named_modules())
        layers = LAYERS if layers is None else layers
        self.layers = {label: modules[name] for label, name in layers.items()
                       if name in modules and uses_batch_statistics(modules[name])}
        self.skipped = sorted(set(layers) - set(self.layers))
        self.armed = False
        self._records = {}
        self._handles = [m.register_forward_hook(partial(self._record, label)) for label, m in self.layers.items()]

    def _record(self, label, module, inputs, output):
        if not (self.armed and module.training) or label in self._records:
            return
        x = inputs[0].detach()
        if x.numel() == 0:
            return
        with torch.no_grad():
            mean, var = normalizing_statistics(module, x, output)
            sums = channel_sums(x)
        self._records[label] = {"sums": sums, "mean": mean.double().cpu(), "var": var.double().cpu(),
                                "eps": float(module.eps)}

    def measure(self):
        records, self._records, self.armed = self._records, {}, False
        gathered = _all_gather(records)
        errors = {}
        for label in self.layers:
            if not all(label in r for r in gathered):
                continue
            mean_all, var_all = pooled_mean_var(sum(r[label]["sums"] for r in gathered))
            per_process = [relative_errors(r[label]["mean"], r[label]["var"], mean_all, var_all, r[label]["eps"])
                           for r in gathered]
            errors[label] = {key: sum(e[key] for e in per_process) / len(per_process) for key in ERRORS}
        return errors

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def channel_sums(x):
    """[3, C] float64 on the CPU: per channel of ``x`` the count, sum and sum of squares over all other
    dimensions; sums of several of them pool their inputs (``pooled_mean_var``)."""
    x64, dims = x.detach().double(), (0,) + tuple(range(2, x.dim()))
    count = torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=torch.double, device=x.device)
    return torch.stack([count, x64.sum(dims), x64.square().sum(dims)]).cpu()


def pooled_mean_var(sums):
    """Per-channel mean and (biased) variance of the inputs whose ``channel_sums`` add up to ``sums``."""
    mean = sums[1] / sums[0]
    return mean, (sums[2] / sums[0] - mean.square()).clamp_min(0.0)


def relative_errors(mean, var, mean_all, var_all, eps):
    """{"mean": ..., "var": ..., "sqmean": ...} (see the module docstring), each averaged over the
    channels where it is defined."""
    scale, sqmean_all = var_all + eps, var_all + mean_all.square()
    per_channel = {"mean": (mean - mean_all).abs() / scale.sqrt(), "var": (var - var_all).abs() / scale,
                   "sqmean": (var + mean.square() - sqmean_all).abs() / (sqmean_all + eps)}
    out = {}
    for key, values in per_channel.items():
        finite = values[torch.isfinite(values)]
        out[key] = finite.mean().item() if finite.numel() else math.nan
    return out


def _all_gather(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class StatisticsErrorHook(HookBase):
    """Measures ``StatisticsError`` every ``period`` iterations on every process and puts into the
    trainer's storage (metrics.json) ``stats_error/<label>/<error>`` (mean, var, sqmean) and their
    averages over the measured layers, ``stats_error/<error>``.

    Every process must run it (the gather is collective). ``period`` should be a multiple of the
    writers' period (20 in DefaultTrainer) so that every value reaches metrics.json.
    """

    def __init__(self, layers=None, period=20):
        if period < 1:
            raise ValueError(f"StatisticsErrorHook: period must be >= 1, got {period}")
        self.layer_names, self.period = layers, period

    def before_train(self):
        model = self.trainer.model
        self.probe = StatisticsError(model.module if hasattr(model, "module") else model, self.layer_names)
        if self.probe.skipped:
            logger.info("Statistics error: not measured at %s (absent, or no batch statistics)",
                        ", ".join(self.probe.skipped))

    def _due(self):
        return self.trainer.iter % self.period == 0

    def before_step(self):
        self.probe.armed = bool(self.probe.layers) and self._due()

    def after_step(self):
        if not (self.probe.layers and self._due()):
            return
        errors = self.probe.measure()
        if comm.is_main_process() and errors:
            scalars = {f"stats_error/{label}/{key}": value for label, e in errors.items() for key, value in e.items()}
            for key in ERRORS:
                scalars[f"stats_error/{key}"] = sum(e[key] for e in errors.values()) / len(errors)
            self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)

    def after_train(self):
        self.probe.remove()


@torch.no_grad()
def eval_statistics_error(model, batches):
    """How far the statistics each norm normalizes with in eval (its running estimates) are from those
    of the inputs it sees in eval: per norm with ``running_mean`` and ``running_var`` that uses batch
    statistics in training, the errors of this module's docstring between those buffers and the
    per-channel mean and variance of its inputs over all of ``batches`` (the model in eval mode, as
    evaluation runs it). A norm trained well has errors near 0; a large one means evaluation
    normalizes with statistics that the trained network does not produce.

    Returns {module name: {"mean": ..., "var": ..., "sqmean": ..., "input_abs_mean": ..., "input_std": ...}}
    (the last two: the channels' mean |mean| and standard deviation of the inputs); the model is left in
    eval mode."""
    norms = {name: m for name, m in model.named_modules()
             if uses_batch_statistics(m) and isinstance(getattr(m, "running_mean", None), torch.Tensor)
             and isinstance(getattr(m, "running_var", None), torch.Tensor)}
    sums = {}

    def record(name, module, inputs, output):
        x = inputs[0]
        if x.numel() == 0:
            return
        total = channel_sums(x)
        sums[name] = sums[name] + total if name in sums else total

    handles = [m.register_forward_hook(partial(record, name)) for name, m in norms.items()]
    try:
        model.eval()
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for name, total in sums.items():
        module = norms[name]
        mean_all, var_all = pooled_mean_var(total)
        errors[name] = relative_errors(module.running_mean.double().cpu(), module.running_var.double().cpu(),
                                       mean_all, var_all, float(module.eps))
        errors[name].update(input_abs_mean=mean_all.abs().mean().item(), input_std=var_all.sqrt().mean().item())
    return errors
