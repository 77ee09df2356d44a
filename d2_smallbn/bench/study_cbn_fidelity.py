"""Study of CBN's statistics fidelity (the mechanism behind the CBN paper's Figure 3): during real
SGD training at batch 2, how close are the window statistics that CBN normalizes with to the true
statistics of the current weights?

Set-up. A small conv net is trained on a synthetic 6-class shape task (``d2_smallbn.benchmark.
shapes_batch``: the class is the shape, with a partial class colour cue (``--colour-cue``) so that
the net learns within a few hundred steps; position, scale and background are random) with
SGD + momentum 0.9 at batch 2, with BN or with CBN (``--train-norms``):

    stem conv + GN + ReLU, conv /2 + GN + ReLU      (batch-independent: see below)
    probed conv + NORM + ReLU                       (NORM = BN, or CBN with window --train-window)
    conv /2 + NORM + ReLU, global average pool, linear

The layers below the probed conv use GroupNorm, so the probed conv's input is a deterministic
function of the image and the current weights, and the true statistics of its output are well
defined: TRUE = per-channel mean and (biased) variance of the probed conv's output over a fixed
held-out set of ``--heldout`` images, under the current weights of all layers.

At every ``--measure-every``-th step t (weights W_t, before the SGD update) the tool compares with
TRUE, for each window k in ``--ks``:

  (a) compensated: CBN's estimate (Algorithm 1): the current batch's (mu, nu) and the k-1 previous
      iterations' entries compensated to W_t with the first-order Taylor term (rho = 1), computed
      by a separate ``CrossIterationBatchNorm2d`` probe (window max(--ks)) that stores an entry of
      the probed conv every step, through its ``compensated_history`` API; then
      mu_bar = mean mu, nu_bar = mean max(nu, mu^2), var = max(nu_bar - mu_bar^2, 0);
  (b) naive: the same entries uncompensated (rho = 0, the paper's "Naive CBN");
  (c) BN: the current batch alone (k = 1, where (a) and (b) coincide);
  (d) exact window: the images of the same k batches re-forwarded through the CURRENT network, the
      statistics CBN approximates; its error to TRUE is what k batches can do at best, and the
      distance of (a) and (b) to (d) isolates the staleness that the compensation removes (the
      Taylor step covers the probed conv's own weights, not the drift of the layers below).

Errors, averaged over channels: mean error |mu_hat - mu| / sigma and variance error
|var_hat - var| / var (sigma, mu, var: TRUE). Averages over the measured steps t >= max(--ks) - 1,
the same steps for every k.

Usage: python -m d2_smallbn.bench.study_cbn_fidelity [--steps 400] [--ks 1,2,4,8,16] [--train-norms bn,cbn]
           [--train-window 8] [--train-burnin 0] [--lr 0.02] [--colour-cue 0.5] [--heldout 512] [--size 32]
           [--width 32] [--measure-every 2] [--batch 2] [--weight-decay 1e-4]
           [--seed 0] [--out DIR] [--tiny] [--threads N] [--device cpu|cuda]
Writes DIR/cbn_fidelity.json and DIR/cbn_fidelity.png (and prints a summary table).
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
from ..layers import CBNConv2d, CrossIterationBatchNorm2d, NormStateDriver

ESTIMATORS = ("compensated", "naive", "exact_window")


class StudyNet(nn.Module):
    def __init__(self, width, norm, window, burnin, num_classes):
        super().__init__()
        c1, c2 = max(width // 2, 4), width
        self.lower = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.GroupNorm(min(4, c1), c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.GroupNorm(min(8, c2), c2), nn.ReLU(inplace=True))
        self.probe_conv, self.probe_block = self._block(c2, c2, 1, norm, window, burnin)
        self.top_conv, self.top_block = self._block(c2, 2 * c2, 2, norm, window, burnin)
        self.fc = nn.Linear(2 * c2, num_classes)

    @staticmethod
    def _block(cin, cout, stride, norm, window, burnin):
        if norm == "bn":
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            return conv, nn.Sequential(conv, nn.BatchNorm2d(cout))
        conv = CBNConv2d(cin, cout, 3, stride=stride, padding=1,
                         norm=CrossIterationBatchNorm2d(cout, window_size=window, burnin_iters=burnin))
        return conv, conv

    def forward(self, x):
        x = F.relu(self.probe_block(self.lower(x)))
        x = F.relu(self.top_block(x))
        return self.fc(x.mean((2, 3)))

    def pre_norm(self, images):
        """The probed conv's output (before its norm) under the current weights."""
        return self.probe_conv._conv_forward(self.lower(images), self.probe_conv.weight, None)


def moments(y):
    """Per-channel mean and mean of squares over (N, H, W)."""
    y = y.double()
    return y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))


@torch.no_grad()
def true_stats(net, heldout, chunk=256):
    sums = None
    for i in range(0, heldout.shape[0], chunk):
        m, s = moments(net.pre_norm(heldout[i:i + chunk]))
        n = min(chunk, heldout.shape[0] - i)
        sums = (m * n, s * n) if sums is None else (sums[0] + m * n, sums[1] + s * n)
    mean, sq = sums[0] / heldout.shape[0], sums[1] / heldout.shape[0]
    return mean, (sq - mean * mean).clamp_min(0)


def window_estimate(means, sqmeans):
    """Algorithm 1, lines 6-9: (mu_bar, var_bar) of a window of per-iteration (mu, nu), [k, C]."""
    mu = means.mean(0)
    nu = torch.maximum(sqmeans, means * means).mean(0)
    return mu, (nu - mu * mu).clamp_min(0)


def errors(est, truth):
    (mu_hat, var_hat), (mu, var) = est, truth
    sigma = var.sqrt().clamp_min(1e-12)
    return {"mean_err": ((mu_hat - mu).abs() / sigma).mean().item(),
            "var_err": ((var_hat - var).abs() / var.clamp_min(1e-24)).mean().item()}


def recent_slots(probe, count):
    """Slots of the probe's ``count`` most recent history entries, newest first."""
    stored, slots = int(probe.num_stored), probe.window_size - 1
    return [(stored - 1 - i) % slots for i in range(count)]


@torch.no_grad()
def measure(net, probe, x_now, images_now, past_images, heldout, ks):
    """Errors of every estimator for every k at the current weights."""
    w = net.probe_conv.weight
    y_now = net.probe_conv._conv_forward(x_now, w, None)
    mu_now, nu_now = moments(y_now)
    truth = true_stats(net, heldout)
    rho = probe.rho
    comp = [t.double() for t in probe.compensated_history(w)]
    probe.rho = 0.0
    naive = [t.double() for t in probe.compensated_history(w)]
    probe.rho = rho
    # exact window: the same batches through the current network
    past_moments = [moments(net.pre_norm(img)) for img in past_images]  # newest first
    out = {}
    for k in ks:
        slots = recent_slots(probe, k - 1)
        # equal-sized batches: the union's moments are the means of the per-batch moments
        exact_means = torch.stack([mu_now] + [m for m, _ in past_moments[:k - 1]]).mean(0)
        exact_sqs = torch.stack([nu_now] + [s for _, s in past_moments[:k - 1]]).mean(0)
        exact = (exact_means, (exact_sqs - exact_means * exact_means).clamp_min(0))
        row = {}
        for name, (hm, hs) in (("compensated", comp), ("naive", naive)):
            means = torch.cat([mu_now[None], hm[slots]]) if slots else mu_now[None]
            sqs = torch.cat([nu_now[None], hs[slots]]) if slots else nu_now[None]
            est = window_estimate(means, sqs)
            row[name] = errors(est, truth)
            to_window = errors(est, exact)
            row[name]["mean_err_vs_window"] = to_window["mean_err"]
            row[name]["var_err_vs_window"] = to_window["var_err"]
        row["exact_window"] = errors(exact, truth)
        out[k] = row
    return out


def train_one(norm, args, device):
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    classes = len(SHAPE_CLASSES)
    heldout, heldout_labels = shapes_batch(args.heldout, args.size, torch.Generator().manual_seed(args.seed + 10**6),
                                           colour_cue=args.colour_cue)
    heldout, heldout_labels = heldout.to(device), heldout_labels.to(device)
    net = StudyNet(args.width, norm, args.train_window, args.train_burnin, classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    kmax = max(args.ks)
    probe = CrossIterationBatchNorm2d(args.width, window_size=max(kmax, 2), burnin_iters=0).to(device)
    probe.attach(net.probe_conv.weight.shape, 1)
    probe.train()
    captured = {}
    net.probe_conv.register_forward_pre_hook(lambda m, inp: captured.__setitem__("x", inp[0].detach()))
    driver = NormStateDriver(net)  # the trained net's CBN layers (the probe is driven by hand below)
    past = deque(maxlen=max(kmax - 1, 1))  # previous batches' images, newest first
    records, losses = [], []
    for t in range(args.steps):
        images, labels = shapes_batch(args.batch, args.size, g, colour_cue=args.colour_cue)
        images, labels = images.to(device), labels.to(device)
        driver.before_step(t)
        net.train()
        loss = F.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(finite_or_raise(loss.item(), f"{norm} training loss"))
        x = captured["x"]
        if t % args.measure_every == 0 and t >= kmax - 1:
            records.append((t, measure(net, probe, x, images, list(past), heldout, args.ks)))
        with torch.no_grad():  # the probe stores this step's entry (weights W_t)
            probe(net.probe_conv._conv_forward(x, net.probe_conv.weight, None), x, net.probe_conv)
        past.appendleft(images)
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(heldout).argmax(1) == heldout_labels).float().mean().item()
    return summarize(records, args.ks, losses, acc)


def summarize(records, ks, losses, acc):
    if not records:
        raise ValueError("no measured steps: --steps must exceed max(--ks) - 1")
    by_k = {}
    for k in ks:
        row = {}
        for est in ESTIMATORS:
            keys = records[0][1][k][est].keys()
            row[est] = {key: statistics.fmean(r[k][est][key] for _, r in records) for key in keys}
        by_k[str(k)] = row
    kmax = max(ks)
    series = {"steps": [t for t, _ in records], "k": kmax}
    for est in ("compensated", "naive"):
        for key in ("mean_err", "var_err"):
            series[f"{est}_{key}"] = [r[kmax][est][key] for _, r in records]
    for key in ("mean_err", "var_err"):
        series[f"bn_{key}"] = [r[min(ks)]["naive"][key] for _, r in records] if min(ks) == 1 else None
    n = max(1, len(losses) // 10)
    return {"by_k": by_k, "series": series, "measured_steps": len(records),
            "loss_first": statistics.fmean(losses[:n]), "loss_last": statistics.fmean(losses[-n:]),
            "heldout_accuracy": acc, "chance_accuracy": 1 / len(SHAPE_CLASSES)}


def table(results, ks):
    lines = ["| train norm | k | mean err: compensated / naive / exact window | var err: compensated / naive / "
             "exact window | staleness (var err vs exact window): compensated / naive |", "|---|---|---|---|---|"]
    for norm, res in results.items():
        for k in ks:
            r = res["by_k"][str(k)]
            c, nv, ex = r["compensated"], r["naive"], r["exact_window"]
            lines.append(f"| {norm} | {k} | {c['mean_err']:.3f} / {nv['mean_err']:.3f} / {ex['mean_err']:.3f} | "
                         f"{c['var_err']:.3f} / {nv['var_err']:.3f} / {ex['var_err']:.3f} | "
                         f"{c['var_err_vs_window']:.3f} / {nv['var_err_vs_window']:.3f} |")
    return "\n".join(lines)


def smooth(values, n):
    out, acc = [], deque(maxlen=max(n, 1))
    for v in values:
        acc.append(v)
        out.append(sum(acc) / len(acc))
    return out


def plot(report, path):
    plt = pyplot()
    results, ks = report["results"], report["config"]["ks"]
    norms = list(results)
    fig, axes = plt.subplots(len(norms), 4, figsize=(18, 4.2 * len(norms)), squeeze=False)
    styles = {"compensated": ("tab:green", "-", "CBN compensated"), "naive": ("tab:red", "--", "naive (rho=0)"),
              "exact_window": ("tab:gray", ":", "exact window (re-forwarded)")}
    for row, norm in zip(axes, norms):
        res = results[norm]
        for ax, key, title in ((row[0], "mean_err", "mean error |mu^ - mu| / sigma"),
                               (row[1], "var_err", "variance error |var^ - var| / var")):
            for est, (color, ls, label) in styles.items():
                ax.plot(ks, [res["by_k"][str(k)][est][key] for k in ks], color=color, ls=ls, marker="o", label=label)
            if 1 in ks:
                ax.axhline(res["by_k"]["1"]["naive"][key], color="tab:blue", lw=0.8, label="BN (batch of 2)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks)
            ax.set_xticklabels([str(k) for k in ks])
            ax.set_xlabel("window k (iterations)")
            ax.set_title(f"trained with {norm.upper()}: {title} vs TRUE", fontsize=9)
            ax.legend(fontsize=7)
        ax = row[2]
        for est in ("compensated", "naive"):
            color, ls, label = styles[est]
            for key, marker in (("mean_err_vs_window", "o"), ("var_err_vs_window", "s")):
                ax.plot(ks, [res["by_k"][str(k)][est][key] for k in ks], color=color, ls=ls, marker=marker,
                        label=f"{label}: {key.split('_')[0]}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("window k (iterations)")
        ax.set_title("staleness: error vs the exact window (same batches, current weights)", fontsize=9)
        ax.legend(fontsize=7)
        ax = row[3]
        s = res["series"]
        n = max(1, len(s["steps"]) // 20)
        for est, color, label in (("compensated", "tab:green", "compensated"), ("naive", "tab:red", "naive"),
                                  ("bn", "tab:blue", "BN (batch of 2)")):
            if s.get(f"{est}_var_err") is not None:
                ax.plot(s["steps"], smooth(s[f"{est}_var_err"], n), color=color, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(f"variance error vs TRUE over training, k={s['k']} (running mean of {n})", fontsize=9)
        ax.legend(fontsize=7)
    cfg = report["config"]
    fig.suptitle(f"CBN statistics fidelity: batch {cfg['batch']}, lr {cfg['lr']}, {cfg['steps']} steps, "
                 f"TRUE over {cfg['heldout']} held-out images{' (tiny)' if cfg['tiny'] else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_norms(text):
    norms = [v.strip() for v in text.split(",") if v.strip()]
    if not norms or any(n not in ("bn", "cbn") for n in norms):
        raise argparse.ArgumentTypeError("--train-norms takes bn and/or cbn, e.g. bn,cbn")
    return norms


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="SGD steps (default 400; 24 with --tiny)")
    p.add_argument("--ks", type=int_list("--ks", 1, "1,2,4,8,16"), default=None, help="windows k (default 1,2,4,8,16; 1,2,4,8 with --tiny)")
    p.add_argument("--train-norms", type=parse_norms, default=["bn", "cbn"], help="bn,cbn (default both)")
    p.add_argument("--train-window", type=int, default=8, help="CBN window when training with CBN (default 8)")
    p.add_argument("--train-burnin", type=int, default=0, help="CBN burn-in when training with CBN (default 0)")
    p.add_argument("--heldout", type=int, default=None, help="images of the TRUE statistics (default 512; 64 tiny)")
    p.add_argument("--measure-every", type=int, default=None, help="measure every n-th step (default 2; 1 tiny)")
    add_shape_task_arguments(p, out="output/study_cbn_fidelity")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (24 if tiny else 400)
    args.ks = args.ks or ([1, 2, 4, 8] if tiny else [1, 2, 4, 8, 16])
    args.heldout = args.heldout or (64 if tiny else 512)
    args.measure_every = args.measure_every or (1 if tiny else 2)
    shape_task_defaults(p, args)
    if args.steps < max(args.ks) or args.batch < 1 or args.train_window < 1 or args.size < 8 or args.width < 4:
        p.error("--steps must be >= max(--ks); --batch, --train-window >= 1; --size >= 8; --width >= 4")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, start = begin(args)
    results = {norm: train_one(norm, args, device) for norm in args.train_norms}
    report = {
        **report_head(device),
        "config": {"steps": args.steps, "ks": args.ks, "train_norms": args.train_norms,
                   "train_window": args.train_window, "train_burnin": args.train_burnin, "batch": args.batch,
                   "lr": args.lr, "colour_cue": args.colour_cue, "momentum": 0.9, "weight_decay": args.weight_decay,
                   "heldout": args.heldout,
                   "size": args.size, "width": args.width, "measure_every": args.measure_every, "seed": args.seed,
                   "tiny": args.tiny, "classes": list(SHAPE_CLASSES)},
        "definitions": {
            "TRUE": "per-channel mean and biased variance of the probed conv's output over the held-out images, "
                    "current weights",
            "mean_err": "channel mean of |mu_hat - mu_true| / sigma_true",
            "var_err": "channel mean of |var_hat - var_true| / var_true",
            "*_vs_window": "the same errors against the exact window (the k batches re-forwarded with the current "
                           "weights) instead of TRUE",
            "compensated": "CBN Algorithm 1 with rho=1 (CrossIterationBatchNorm2d.compensated_history)",
            "naive": "rho=0", "exact_window": "the k batches re-forwarded with the current weights",
            "bn": "k=1 (the current batch alone)",
            "averaging": "mean over measured steps t >= max(ks) - 1",
        },
        "results": results,
    }
    learned = [f"{norm}: " + learning_line(res["loss_first"], res["loss_last"], res["heldout_accuracy"],
                                           res["chance_accuracy"]) for norm, res in results.items()]
    finish_study(report, start, args.out, "cbn_fidelity", plot, [table(results, args.ks), *learned])
    return 0


if __name__ == "__main__":
    sys.exit(main())
