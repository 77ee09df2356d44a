"""Study of MABN's premise (the MABN paper's Figures 2 and 4): at batch 2 the backward-pass batch
statistics g_B and Psi_B are far noisier than at batch 32, and their simple moving average over
the last m iterations brings the noise down to about the batch-32 level, even though the weights
change between those iterations.

Set-up. A small conv net with BN after every conv (three convs, the probed BN after the third
one, one more conv, global average pool, linear) is trained with SGD + momentum 0.9 at batch 2 on
the synthetic shape task of ``d2_smallbn.benchmark.shapes_batch`` (6 classes, partial class
colour cue ``--colour-cue``). For the probed BN layer, with x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps)
its normalized output and dL/dx_hat the gradient of the SUM of the per-sample losses (so that the
scale does not depend on the batch size), the per-channel statistics over (N, H, W) are

    g_B   = mean(dL/dx_hat)              Psi_B = mean(x_hat * dL/dx_hat)      (backward)
    mu_B  = mean(x)                      sigma_B^2 = mean((x - mu_B)^2)        (forward, for context)

Every step t, at the current weights W_t:

- batch2:   the training batch's statistics (the batch-2 BN statistics the step actually uses);
- sma<m>:   the simple moving average of the last m batch2 values (m in ``--ms``), what MABN uses
            for Psi (and chi^2) instead: mixing iterations with different weights;
- batch32:  the statistics of a separate batch of ``--large-batch`` (default 32) fresh images at the
            same weights W_t (forward + backward, no update, BN running statistics untouched).

Variance of a series: per channel, the variance over consecutive non-overlapping windows of
``--var-window`` iterations (after the first max(m) iterations), then the mean over channels and
windows. It includes the slow drift of the true value within a window, the same for every series.
Reported: each series' variance and its ratio to batch32's, per statistic.

Usage: python -m d2_smallbn.bench.study_mabn_premise [--steps 600] [--ms 4,16] [--var-window 50]
           [--large-batch 32] [--lr 0.02] [--colour-cue 0.5] [--size 32] [--width 32] [--seed 0]
           [--out DIR] [--tiny] [--threads N] [--device cpu|cuda]
Writes DIR/mabn_premise.json and DIR/mabn_premise.png (and prints a summary table).
"""
import argparse
import statistics
import sys
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from .cli import add_shape_task_arguments, begin, finish_study, learning_line, report_head, shape_task_defaults
from .common import SHAPE_CLASSES, finite_or_raise, int_list, pyplot, shapes_batch

STATS = ("g", "psi", "mu", "var")
STAT_LABELS = {"g": "g_B = mean dL/dx_hat", "psi": "Psi_B = mean x_hat dL/dx_hat", "mu": "mu_B (forward)",
               "var": "sigma_B^2 (forward)"}


class ProbedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d (training: batch statistics) that records mu_B, sigma_B^2, g_B and Psi_B of
    each training forward/backward into ``self.record``; ``grad_scale`` turns the gradient of the
    mean loss into that of the summed loss (the batch size)."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.record = {}
        self.grad_scale = 1.0

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            if self.momentum:
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
        x_hat = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        self.record = {"mu": mean.detach(), "var": var.detach()}
        if x_hat.requires_grad:
            x_hat_d = x_hat.detach()

            def hook(grad):
                grad = grad * self.grad_scale
                self.record["g"] = grad.mean((0, 2, 3)).detach()
                self.record["psi"] = (grad * x_hat_d).mean((0, 2, 3)).detach()

            x_hat.register_hook(hook)
        return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class StudyNet(nn.Module):
    def __init__(self, width, num_classes):
        super().__init__()
        c1, c2 = max(width // 2, 4), width

        def block(cin, cout, stride, norm=None):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 norm or nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.probe = ProbedBatchNorm2d(c2)
        self.body = nn.Sequential(block(3, c1, 1), block(c1, c2, 2), block(c2, c2, 1, self.probe),
                                  block(c2, 2 * c2, 2))
        self.fc = nn.Linear(2 * c2, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def batch_norms(net):
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def step_stats(net, images, labels, update_running):
    """Forward + backward of one batch; returns the probe's record and the loss. Parameter
    gradients are left in .grad (the caller steps or discards them)."""
    norms = batch_norms(net)
    saved = [m.momentum for m in norms]
    if not update_running:
        for m in norms:
            m.momentum = 0.0  # running statistics unchanged
    net.probe.grad_scale = float(images.shape[0])
    try:
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
    return {k: v.double() for k, v in net.probe.record.items()}, loss.item()


def windowed_variance(series, start, window):
    """Mean over channels and non-overlapping windows of the per-channel variance; also the
    per-window values. ``series``: [T, C] tensor."""
    per_window, ends = [], []
    for s in range(start, series.shape[0] - window + 1, window):
        chunk = series[s:s + window]
        per_window.append(chunk.var(0, unbiased=True).mean().item())
        ends.append(s + window - 1)
    return per_window, ends


def run(args, device):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    g_large = torch.Generator().manual_seed(args.seed + 1)
    net = StudyNet(args.width, len(SHAPE_CLASSES)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    mmax = max(args.ms)
    history = deque(maxlen=mmax)
    series = {f"{s}": {"batch2": [], "batch32": [], **{f"sma{m}": [] for m in args.ms}} for s in STATS}
    losses = []
    for t in range(args.steps):
        net.train()
        # the large batch at the current weights, discarded
        xl, yl = shapes_batch(args.large_batch, args.size, g_large, colour_cue=args.colour_cue)
        large, _ = step_stats(net, xl.to(device), yl.to(device), update_running=False)
        opt.zero_grad(set_to_none=True)
        # the training step at batch 2
        x, y = shapes_batch(args.batch, args.size, g, colour_cue=args.colour_cue)
        small, loss = step_stats(net, x.to(device), y.to(device), update_running=True)
        losses.append(finite_or_raise(loss, "training loss"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(small)
        for s in STATS:
            series[s]["batch2"].append(small[s])
            series[s]["batch32"].append(large[s])
            for m in args.ms:
                recent = list(history)[-m:]
                series[s][f"sma{m}"].append(torch.stack([h[s] for h in recent]).mean(0))
    heldout, labels = shapes_batch(512, args.size, torch.Generator().manual_seed(args.seed + 10**6),
                                   colour_cue=args.colour_cue)
    net.eval()
    with torch.no_grad():
        acc = (net(heldout.to(device)).argmax(1).cpu() == labels).float().mean().item()
    return series, losses, acc


def analyse(series, args):
    start = max(args.ms) - 1  # every SMA is over a full buffer from here on
    results, curves = {}, {}
    for s in STATS:
        results[s], curves[s] = {}, {}
        for name, values in series[s].items():
            per_window, ends = windowed_variance(torch.stack(values).cpu(), start, args.var_window)
            if not per_window:
                raise ValueError("no complete variance window: raise --steps or lower --var-window")
            results[s][name] = {"variance": statistics.fmean(per_window)}
            curves[s][name] = per_window
            curves["window_end_steps"] = ends
        ref = results[s]["batch32"]["variance"]
        for name in results[s]:
            results[s][name]["ratio_to_batch32"] = results[s][name]["variance"] / ref
        results[s]["mean_square_batch32"] = statistics.fmean(
            (torch.stack(series[s]["batch32"][start:]) ** 2).mean(1).tolist())
    return results, curves


def table(results, ms):
    names = ["batch2"] + [f"sma{m}" for m in ms] + ["batch32"]
    lines = ["| statistic | " + " | ".join(f"{n}: variance (ratio to batch32)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for s in STATS:
        cells = [f"{results[s][n]['variance']:.3g} ({results[s][n]['ratio_to_batch32']:.2f})" for n in names]
        lines.append(f"| {STAT_LABELS[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report, path):
    plt = pyplot()
    res, curves, cfg = report["results"], report["curves"], report["config"]
    names = ["batch2"] + [f"sma{m}" for m in cfg["ms"]] + ["batch32"]
    colors = {"batch2": "tab:red", "batch32": "tab:blue"}
    sma_colors = ["tab:olive", "tab:green", "tab:purple", "tab:brown"]
    for i, m in enumerate(cfg["ms"]):
        colors[f"sma{m}"] = sma_colors[i % len(sma_colors)]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    steps = curves["window_end_steps"]
    for ax, s in zip((axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]), STATS):
        for n in names:
            label = {"batch2": f"batch {cfg['batch']}", "batch32": f"batch {cfg['large_batch']}"}.get(
                n, f"SMA over {n[3:]} iterations (batch {cfg['batch']})")
            ax.plot(steps, curves[s][n], color=colors[n], marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel(f"training step (end of a {cfg['var_window']}-iteration window)")
        ax.set_title(f"variance of {STAT_LABELS[s]}", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[0, 2]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(STATS))], [res[s][n]["ratio_to_batch32"] for s in STATS],
               width=width, color=colors[n], label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(STATS))])
    ax.set_xticklabels(["g_B", "Psi_B", "mu_B", "sigma_B^2"])
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_title(f"variance / variance at batch {cfg['large_batch']} (mean over windows)", fontsize=10)
    ax.legend(fontsize=7)
    axes[1, 2].axis("off")
    axes[1, 2].text(0.0, 0.95, "\n".join([
        f"steps {cfg['steps']}, batch {cfg['batch']}, lr {cfg['lr']}",
        f"held-out accuracy {report['heldout_accuracy']:.2f} (chance {1 / len(SHAPE_CLASSES):.2f})",
        f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}",
        "", "g_B, Psi_B: gradient of the summed loss,", "so the scale is batch-size independent"]),
        va="top", fontsize=10, family="monospace")
    fig.suptitle(f"MABN premise: batch statistics at batch {cfg['batch']}, their SMA, and batch "
                 f"{cfg['large_batch']}, along one SGD run{' (tiny)' if cfg['tiny'] else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="SGD steps at batch 2 (default 600; 40 with --tiny)")
    p.add_argument("--ms", type=int_list("--ms", 2, "4,16"), default=None, help="SMA lengths m (default 4,16; 2,4 with --tiny)")
    p.add_argument("--var-window", type=int, default=None, help="iterations per variance window (default 50; 8 tiny)")
    p.add_argument("--large-batch", type=int, default=32)
    add_shape_task_arguments(p, out="output/study_mabn_premise")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (40 if tiny else 600)
    args.ms = args.ms or ([2, 4] if tiny else [4, 16])
    args.var_window = args.var_window or (8 if tiny else 50)
    shape_task_defaults(p, args)
    if args.var_window < 2 or args.batch < 1 or args.large_batch < 2 or args.size < 8 or args.width < 4:
        p.error("--var-window >= 2, --batch >= 1, --large-batch >= 2, --size >= 8, --width >= 4")
    if args.steps < max(args.ms) - 1 + args.var_window:
        p.error("--steps must be at least max(--ms) - 1 + --var-window")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, start = begin(args)
    series, losses, acc = run(args, device)
    results, curves = analyse(series, args)
    n = max(1, len(losses) // 10)
    report = {
        **report_head(device),
        "config": {"steps": args.steps, "ms": args.ms, "var_window": args.var_window, "batch": args.batch,
                   "large_batch": args.large_batch, "lr": args.lr, "momentum": 0.9,
                   "weight_decay": args.weight_decay, "colour_cue": args.colour_cue, "size": args.size,
                   "width": args.width, "seed": args.seed, "tiny": args.tiny},
        "definitions": {
            "g": "per-channel mean over (N,H,W) of dL/dx_hat, L = sum of per-sample losses",
            "psi": "per-channel mean of x_hat * dL/dx_hat", "mu": "batch mean", "var": "biased batch variance",
            "batch2": "the training batch", "smaM": "simple moving average of the last M batch2 values",
            "batch32": "a separate large batch at the same weights (no update)",
            "variance": "per-channel variance over non-overlapping windows of var_window iterations, mean over "
                        "channels and windows (windows start once every SMA buffer is full)",
            "mean_square_batch32": "mean over steps and channels of the squared batch32 value (signal scale)",
        },
        "results": results,
        "curves": curves,
        "loss_first": statistics.fmean(losses[:n]), "loss_last": statistics.fmean(losses[-n:]),
        "heldout_accuracy": acc,
    }
    learned = learning_line(report["loss_first"], report["loss_last"], acc, 1 / len(SHAPE_CLASSES))
    finish_study(report, start, args.out, "mabn_premise", plot, [table(results, args.ms), learned])
    return 0


if __name__ == "__main__":
    sys.exit(main())
