"""CBN's window inside a real training run: the compensated window against the exact one, per layer.

CBN (paper eq. 7-8) normalizes with the statistics of the last k iterations, each compensated to the
current weights W_t by a first-order Taylor step in the layer's own conv weights. Two things can make
that window differ from the statistics of the current network:

  (1) the Taylor step itself: the compensated entry against the *exact* one, the same past input x
      through the current conv, conv(x_{t-tau}, W_t). Exact for the mean (linear in W); for nu it
      falls short by mean(conv(x, W_t - W_{t-tau})^2) (methods.md);
  (2) the input's drift: x_{t-tau} was produced by the layers below as they were then. The Taylor
      step does not cover it; behind a frozen backbone (FPN laterals) there is none.

This tool measures (1) at each probed CBN conv of a run, and, through the statistics-error instrument
(``d2_smallbn.engine.statistics_error``) at the same layers, the window's distance to the whole
batch's statistics, which includes (2). Per measurement, on the main process (each process has its
own window), against the exact window (current batch plus the stored past inputs through W_t):

    compensated_mean / compensated_var   mean and variance error of CBN's window (as it normalizes)
    naive_mean / naive_var               the same window uncompensated (rho = 0, "Naive CBN")
    drift                                |W_t - W_oldest| / |W_t| over the window, the conv's weights
    input_abs_mean / input_std           the channels' mean |mean| and std of the conv's input

(errors as in ``study_cbn_fidelity.errors``: |mu_hat - mu| / sigma and |var_hat - var| / var,
averaged over channels), and ``global_mean`` / ``global_var``: the statistics error of the layer's
norm against the whole batch (all processes). Written to the run's metrics.json as
``cbn_window/<label>/<key>`` and, every measurement, to ``OUTPUT_DIR/cbn_window_probe.json`` (JSON lines).

Usage: python -m d2_smallbn.bench.cbn_window_probe [--layers LABEL=MODULE,...] [--period 10]
           QUICKSTART_ARGUMENTS...
       python -m d2_smallbn.bench.cbn_window_probe --plot RUN_DIR     (draws RUN_DIR/cbn_window_probe.png)
The quickstart arguments are d2-smallbn-quickstart's (e.g. ``--config-file pretrained/...cbn.yaml
--num-gpus 4 --output-dir DIR MODEL.WEIGHTS ...``); the run is that run, measured.
"""
import argparse
import json
import os
import sys
from collections import deque
from functools import partial
from pathlib import Path

import torch
from detectron2.engine import HookBase

from .common import pyplot
from .study_cbn_fidelity import errors, moments, window_estimate
from ..layers import CrossIterationBatchNorm2d

# label -> CBN conv in detectron2's R-FPN: the level-3 lateral (input: the frozen backbone's res3)
# and output conv (input: lateral plus the top-down path), and the same at level 5
DEFAULT_LAYERS = {"fpn_lateral3": "backbone.fpn_lateral3", "fpn_output3": "backbone.fpn_output3",
                  "fpn_lateral5": "backbone.fpn_lateral5", "fpn_output5": "backbone.fpn_output5"}


def input_scale(x):
    """How large the conv's input is: the channels' mean |mean| and mean standard deviation (the
    layers below a CBN conv may be unnormalized, e.g. a FrozenBN backbone)."""
    mean, sqmean = moments(x)
    return {"input_abs_mean": mean.abs().mean().item(), "input_std": (sqmean - mean.square()).clamp_min(0).sqrt().mean().item()}


class WindowProbe:
    """Follows one ``CBNConv2d``: keeps the inputs of the iterations its CBN stored (the window's
    past), and ``measure(x)`` compares the window at the current weights with the exact one.

    ``due``: whether the next training forward is measured; the result is in ``last``."""

    def __init__(self, conv):
        norm = getattr(conv, "norm", None)
        if not isinstance(norm, CrossIterationBatchNorm2d):
            raise ValueError(f"{type(conv).__name__} has no CrossIterationBatchNorm2d norm ({type(norm).__name__}): "
                             "probe a conv built as CBNConv2d(..., norm=CrossIterationBatchNorm2d(...))")
        self.conv, self.norm = conv, norm
        slots = max(norm.window_size - 1, 1)
        self.inputs, self.weights = deque(maxlen=slots), deque(maxlen=slots)
        self.due, self.last, self._pending = False, None, None
        self._handles = [conv.register_forward_pre_hook(self._before), conv.register_forward_hook(self._after)]

    def _before(self, conv, inputs):
        if not conv.training:
            return
        x = inputs[0].detach()
        self._pending = (x, self.norm._num_stored)
        if self.due:
            self.last = {**input_scale(x), **(self.measure(x) or {})}
            self.due = False

    def _after(self, conv, inputs, output):
        if self._pending is None:
            return
        x, stored_before = self._pending
        self._pending = None
        if self.norm._num_stored > stored_before:  # the layer stored this iteration's entry
            self.inputs.append(x.clone())
            self.weights.append(conv.weight.detach().clone())

    @torch.no_grad()
    def measure(self, x):
        """Errors of the compensated and naive windows against the exact one at the current weights;
        None while the window is empty or its past is not all held here (e.g. just after a resume)."""
        n = self.norm.history_length
        if n == 0 or len(self.inputs) != n:
            return None
        conv, w = self.conv, self.conv.weight.detach()
        stats = [moments(conv._conv_forward(xp, conv.effective_weight(), None)) for xp in (x, *self.inputs)]
        exact = window_estimate(torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats]))
        now_mean, now_sq = stats[0]
        result = {}
        rho = self.norm.rho
        for name, factor in (("compensated", rho), ("naive", 0.0)):
            self.norm.rho = factor
            try:
                past_mean, past_sq = (t.double() for t in self.norm.compensated_history(w))
            finally:
                self.norm.rho = rho
            window = window_estimate(torch.cat([now_mean[None], past_mean]), torch.cat([now_sq[None], past_sq]))
            e = errors(window, exact)
            result[f"{name}_mean"], result[f"{name}_var"] = e["mean_err"], e["var_err"]
        result["drift"] = ((w - self.weights[0]).norm() / w.norm().clamp_min(1e-12)).item()
        result["window"] = n + 1
        return result

    def remove(self):
        for handle in self._handles:
            handle.remove()


class CBNWindowProbeHook(HookBase):
    """Measures ``WindowProbe`` at ``layers`` ({label: module name of a CBN conv}) every ``period``
    iterations, and the statistics error of their norms against the whole batch (collective: every
    process runs the hook). A layer that is absent or not CBN is an error naming it."""

    def __init__(self, layers=None, period=10):
        if period < 1:
            raise ValueError(f"cbn_window_probe: period must be >= 1, got {period}")
        self.layer_names, self.period = dict(layers or DEFAULT_LAYERS), period

    def before_train(self):
        from detectron2.utils import comm

        from ..engine.hooks import unwrap
        from ..engine.statistics_error import StatisticsError

        model = unwrap(self.trainer.model)
        modules = dict(model.named_modules())
        missing = [f"{label}={name}" for label, name in self.layer_names.items() if name not in modules]
        if missing:
            raise ValueError(f"cbn_window_probe: no module {', '.join(missing)} in the model. Fix: --layers with "
                             "names of the model's CBN convs (e.g. backbone.fpn_lateral3)")
        self.main = comm.is_main_process()
        self.probes = {label: WindowProbe(modules[name]) for label, name in self.layer_names.items()} if self.main \
            else {}
        self.errors = StatisticsError(model, {label: name + ".norm" for label, name in self.layer_names.items()})
        self.path = os.path.join(self.trainer.cfg.OUTPUT_DIR, "cbn_window_probe.json")

    def _due(self):
        return self.trainer.iter % self.period == 0

    def before_step(self):
        due = self._due()
        self.errors.armed = due
        for probe in self.probes.values():
            probe.due, probe.last = due, None

    def after_step(self):
        if not self._due():
            return
        global_errors = self.errors.measure()
        if not self.main:
            return
        record = {}
        for label, probe in self.probes.items():
            values = dict(probe.last or {})
            if label in global_errors:
                values.update(global_mean=global_errors[label]["mean"], global_var=global_errors[label]["var"])
            record.update({f"cbn_window/{label}/{k}": v for k, v in values.items()})
        if not record:
            return
        self.trainer.storage.put_scalars(smoothing_hint=False, **record)
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": self.trainer.iter, **record}) + "\n")

    def after_train(self):
        for probe in self.probes.values():
            probe.remove()
        self.errors.remove()


def parse_layers(text):
    layers = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, sep, name = item.partition("=")
        if not sep or not label or not name:
            raise argparse.ArgumentTypeError(f"--layers: {item!r} is not LABEL=MODULE (e.g. fpn_lateral3=backbone."
                                             "fpn_lateral3)")
        layers[label] = name
    if not layers:
        raise argparse.ArgumentTypeError("--layers: give at least one LABEL=MODULE")
    return layers


PANELS = (("global_mean", "mean error vs the whole batch", "log"),
          ("compensated_mean", "window vs exact window: mean error (compensated -, naive --)", "linear"),
          ("compensated_var", "window vs exact window: var error (compensated -, naive --)", "log"),
          ("drift", "|W_t - W_oldest| / |W_t| over the window", "log"),
          ("input_abs_mean", "conv input: channels' mean |mean|", "log"))
NAIVE = {"compensated_mean": "naive_mean", "compensated_var": "naive_var"}


def plot(folder):
    """RUN_DIR/cbn_window_probe.png from RUN_DIR/cbn_window_probe.json: one panel per quantity."""
    path = Path(folder) / "cbn_window_probe.json"
    if not path.is_file():
        raise SystemExit(f"cbn_window_probe --plot: {path} is missing; give the folder of a probed run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("cbn_window/")})
    plt = pyplot()
    fig, grid = plt.subplots(2, 3, figsize=(13, 7))
    axes = grid.flat
    for ax, (key, title, scale) in zip(axes, PANELS):
        for i, label in enumerate(labels):
            for name, style in ((key, "-"), (NAIVE.get(key), "--")):
                points = [(r["iteration"], r[f"cbn_window/{label}/{name}"]) for r in rows
                          if name and f"cbn_window/{label}/{name}" in r]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{i}", label=label if style == "-" else None)
        ax.set(title=title, xlabel="iteration", yscale=scale)
        ax.title.set_fontsize(9)
    grid[0, 0].legend(fontsize=8)
    grid[1, 2].axis("off")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", type=Path, default=None, metavar="RUN_DIR",
                   help="draw RUN_DIR/cbn_window_probe.png from a probed run's JSON, and train nothing")
    p.add_argument("--layers", type=parse_layers, default=DEFAULT_LAYERS,
                   help="LABEL=MODULE,... CBN convs to probe (default: "
                        + ",".join(f"{k}={v}" for k, v in DEFAULT_LAYERS.items()) + ")")
    p.add_argument("--period", type=int, default=10, help="measure every this many iterations (default 10)")
    args, rest = p.parse_known_args(argv)
    if args.plot is not None:
        print(f"Wrote {plot(args.plot)}")
        return 0
    if args.period < 1:
        p.error(f"--period must be >= 1, got {args.period}")
    from .. import quickstart

    return quickstart.main(rest, hooks=(partial(CBNWindowProbeHook, args.layers, args.period),))


if __name__ == "__main__":
    sys.exit(main())
