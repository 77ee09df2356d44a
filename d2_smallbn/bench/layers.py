"""Benchmark d2_smallbn's conv+norm layers against plain-torch conv+BN / GN baselines.

Every setting is a 3x3 conv (C -> C, padding 1, no bias) followed by a norm:

    train:  BN, FrozenBN (BN in eval mode, no grad to its parameters), GN, GN+WS,
            CBN (CBNConv2d), MABN (CenteredConv2d), BCN+WS (WSConv2d)
    eval:   FrozenBN (= BN eval), GN, GN+WS, unfolded CBN / MABN / BCN+WS,
            and the folded convs of CBN, MABN (plain conv) and BCN+WS (conv + group part)

What is measured:

- train step: forward + backward with a fixed random output gradient; the input requires grad
  (the layer sits inside a network), parameter/input grads are reset outside the timed region;
- eval step: eval mode under torch.no_grad();
- the settings are interleaved round-robin (rotated order each round), so machine noise hits all
  of them alike; every figure is the median over rounds of the per-round ratio against the
  reference measured in the same round (conv+BN for training, conv+FrozenBN eval for inference;
  BCN+WS additionally against GN+WS);
- memory: on CUDA, torch.cuda.max_memory_allocated during one train step minus the memory
  allocated before it, plus the layer's buffers; on CPU, the bytes of the unique storages saved
  for backward (torch.autograd.graph.saved_tensors_hooks) plus the layer's buffers.
  Both CPU-style numbers are always in the JSON.

Before timing, CBN and MABN are primed past their window / ring buffer (so the timed steps are in
the steady state: full CBN window, MABN moving averages with clipping), and the folded convs are
checked against the unfolded eval outputs.

Usage:  d2-smallbn-benchmark-layers [--shapes 100x152,50x76] [--batch 2] [--channels 256]
            [--iters 10] [--warmup 2] [--device cpu|cuda] [--out DIR] [--profile]
Writes DIR/benchmark_layers.json and DIR/benchmark_layers.md and prints the markdown.
"""
import argparse
import copy
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .common import available_cores, device_info, fmt_summary, loadavg, ratio_summary, summary, sync
from ..layers import WSConv2d, fold_conv_norm
from ..norms import NORMS, conv_kwargs, resolve

TRAIN_SETTINGS = ("bn", "frozen_bn", "gn", "gn_ws", "bn_wgrad", "cbn", "mabn", "bcn_ws")
EVAL_SETTINGS = ("frozen_bn", "gn", "gn_ws", "cbn", "mabn", "bcn_ws", "cbn_folded", "mabn_folded", "bcn_ws_folded")
LABELS = {
    "bn": "conv+BN",
    "frozen_bn": "conv+FrozenBN",
    "gn": "conv+GN",
    "gn_ws": "WSconv+GN (GN+WS)",
    "bn_wgrad": "conv+BN + 1 weight-gradient conv (CBN's floor)",
    "cbn": "CBN (CBNConv2d, k=4)",
    "mabn": "MABN (CenteredConv2d)",
    "bcn_ws": "BCN+WS (WSConv2d)",
    "cbn_folded": "CBN folded (eval only)",
    "mabn_folded": "MABN folded (eval only)",
    "bcn_ws_folded": "BCN+WS folded (eval only, GN part kept)",
}
# (setting, phase, measured ratio key, bound, description)
TARGETS = (
    ("cbn", "train", "ratio_vs_bn", 1.45, "train <= 1.45x conv+BN"),
    ("mabn", "train", "ratio_vs_bn", 1.15, "train <= 1.15x conv+BN"),
    ("bcn_ws", "train", "ratio_vs_gn_ws", 1.15, "train <= 1.15x conv+GN+WS"),
    ("cbn_folded", "eval", "ratio_vs_frozen_bn", 1.03, "eval <= 1.03x conv+FrozenBN eval"),
    ("mabn_folded", "eval", "ratio_vs_frozen_bn", 1.03, "eval <= 1.03x conv+FrozenBN eval"),
)
CBN_WINDOW = 4
TABLE_HEADER = "| setting | train step ratio vs BN | peak mem ratio vs BN | eval ratio vs FrozenBN | target | met? |"
MABN_BUFFER = 16
BCN_RATE = 0.01


class _ConvWithExtraWeightGrad(nn.Conv2d):
    """conv plus the one extra weight-gradient convolution CBN needs per step (d nu / dW): what
    any exact CBN pays on top of BN, measured here to show the floor on this device."""

    def forward(self, x):
        y = super().forward(x)
        with torch.no_grad():
            torch.nn.grad.conv2d_weight(x, self.weight.shape, y, self.stride, self.padding, self.dilation, self.groups)
        return y


# ---- construction -------------------------------------------------------------------------

def _randomize_norm(norm, gen):
    """Non-trivial affine parameters and running statistics, so that the fold check means something."""
    with torch.no_grad():
        for name in ("weight", "group_weight"):
            p = getattr(norm, name, None)
            if p is not None:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        for name in ("bias", "group_bias"):
            p = getattr(norm, name, None)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=gen) * 0.1)
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=gen) + 0.5)


def build_train_module(key, channels, groups, seed=0):
    """The training-mode module of a setting (on CPU); all settings share the same conv weight."""
    c = channels
    conv_kw = dict(kernel_size=3, padding=1, bias=False)
    if key in ("bn", "frozen_bn"):
        module = nn.Sequential(nn.Conv2d(c, c, **conv_kw), nn.BatchNorm2d(c))
    elif key == "bn_wgrad":
        module = nn.Sequential(_ConvWithExtraWeightGrad(c, c, **conv_kw), nn.BatchNorm2d(c))
    elif key == "gn":
        module = nn.Sequential(nn.Conv2d(c, c, **conv_kw), nn.GroupNorm(groups, c))
    elif key == "gn_ws":
        module = WSConv2d(c, c, norm=nn.GroupNorm(groups, c), **conv_kw)
    elif key in ("cbn", "mabn", "bcn_ws"):  # built as the table of norms builds them
        name, values = {
            "cbn": ("CBN", {"CBN": {"WINDOW_SIZE": CBN_WINDOW, "BURNIN_ITERS": 0}}),
            "mabn": ("MABN", {"MABN": {"WARMUP_ITERS": 0, "BUFFER_SIZE": MABN_BUFFER, "CLIP_WARMUP_ITERS": 0}}),
            "bcn_ws": ("BCN", {"BCN": {"NUM_GROUPS": groups, "UPDATE_RATE_MODE": "fixed", "UPDATE_RATE": BCN_RATE}}),
        }[key]
        spec, settings = NORMS[name], resolve(values)
        module = spec.conv(c, c, norm=spec.build(c, settings), **conv_kw, **conv_kwargs(spec.conv, settings))
    else:
        raise KeyError(key)
    conv, norm = (module[0], module[1]) if isinstance(module, nn.Sequential) else (module, module.norm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / conv.weight[0].numel()))
    _randomize_norm(norm, torch.Generator().manual_seed(seed + 1))
    module.train()
    if key == "frozen_bn":
        norm.eval()
        norm.requires_grad_(False)
    return module


def _train_step(module, x, grad):
    out = module(x)
    out.backward(grad)
    return out


def _clear_grads(module, x):
    for p in module.parameters():
        p.grad = None
    x.grad = None


def prime(modules, x_small, grad_small):
    """Runs training steps on a small input until CBN's window is full and MABN is past its ring
    buffer, i.e. in the steady state the timed steps must measure."""
    steps = max(CBN_WINDOW, MABN_BUFFER + 1)
    for key, module in modules.items():
        for _ in range(steps):
            _train_step(module, x_small, grad_small)
            _clear_grads(module, x_small)
        norm = getattr(module, "norm", None)
        if hasattr(norm, "steady") and not norm.steady(int(norm.num_steps)):
            raise AssertionError(f"{key}: {type(norm).__name__} not yet as in long training after priming")


def build_eval_modules(train_modules):
    """Eval-mode copies of the primed training modules, plus the folded convs."""
    evals = {}
    src = {"frozen_bn": "bn", "gn": "gn", "gn_ws": "gn_ws", "cbn": "cbn", "mabn": "mabn", "bcn_ws": "bcn_ws"}
    for key, from_key in src.items():
        evals[key] = copy.deepcopy(train_modules[from_key]).eval()
    for key in ("cbn", "mabn", "bcn_ws"):
        evals[key + "_folded"] = fold_conv_norm(evals[key])
    for m in evals.values():
        m.requires_grad_(False)
    return evals


@torch.no_grad()
def check_folding(evals, x):
    """The folded conv's eval output must equal the unfolded eval output (TF32 off for the check,
    since it would round the two differently-scaled weights differently)."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _check_folding(evals, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _check_folding(evals, x):
    report = {}
    for key in ("cbn", "mabn", "bcn_ws"):
        ref = evals[key](x)
        out = evals[key + "_folded"](x)
        err = (out - ref).abs().max().item()
        scale = ref.abs().max().item()
        report[key] = {"max_abs_err": err, "max_abs_ref": scale}
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * max(scale, 1.0)):
            raise AssertionError(f"folded {key} differs from unfolded eval: max abs err {err:.3g} "
                                 f"(max |ref| {scale:.3g})")
        folded = evals[key + "_folded"]
        if key in ("cbn", "mabn") and folded.norm is not None:
            raise AssertionError(f"folded {key} still has a norm: {type(folded.norm).__name__}")
    return report


# ---- measurement --------------------------------------------------------------------------

def time_train(module, x, grad, device):
    _clear_grads(module, x)
    sync(device)
    t0 = time.perf_counter()
    _train_step(module, x, grad)
    sync(device)
    return time.perf_counter() - t0


def time_eval(module, x, device):
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        module(x)
    sync(device)
    return time.perf_counter() - t0


def buffer_bytes(module):
    return sum(b.numel() * b.element_size() for b in module.buffers())


def saved_tensor_bytes(module, x, grad):
    """Bytes of the unique storages autograd saves for backward during one training forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(t.device.type, s.data_ptr())] = s.nbytes()
        return t

    _clear_grads(module, x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.backward(grad)
    _clear_grads(module, x)
    return sum(storages.values())


def cuda_step_peak_bytes(module, x, grad, device):
    _clear_grads(module, x)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _train_step(module, x, grad)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _clear_grads(module, x)
    return peak


def benchmark_shape(args, device, shape, train_modules, eval_modules):
    h, w = shape
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, args.channels, h, w, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(args.batch, args.channels, h, w, generator=gen).to(device)
    x_eval = x.detach()

    # memory (one untimed step each)
    memory = {}
    for key in TRAIN_SETTINGS:
        m = train_modules[key]
        entry = {"saved_bytes": saved_tensor_bytes(m, x, grad), "buffer_bytes": buffer_bytes(m)}
        entry["saved_plus_buffers_bytes"] = entry["saved_bytes"] + entry["buffer_bytes"]
        if device.type == "cuda":
            entry["cuda_step_peak_bytes"] = cuda_step_peak_bytes(m, x, grad, device)
            entry["metric_bytes"] = entry["cuda_step_peak_bytes"] + entry["buffer_bytes"]
        else:
            entry["metric_bytes"] = entry["saved_plus_buffers_bytes"]
        memory[key] = entry
    for key in TRAIN_SETTINGS:
        memory[key]["ratio_vs_bn"] = memory[key]["metric_bytes"] / memory["bn"]["metric_bytes"]

    # timing, round-robin with a rotated order
    train_times = {k: [] for k in TRAIN_SETTINGS}
    eval_times = {k: [] for k in EVAL_SETTINGS}
    for r in range(args.warmup + args.iters):
        timed = r >= args.warmup
        order = TRAIN_SETTINGS[r % len(TRAIN_SETTINGS):] + TRAIN_SETTINGS[:r % len(TRAIN_SETTINGS)]
        for key in order:
            t = time_train(train_modules[key], x, grad, device)
            if timed:
                train_times[key].append(t)
        order = EVAL_SETTINGS[r % len(EVAL_SETTINGS):] + EVAL_SETTINGS[:r % len(EVAL_SETTINGS)]
        for key in order:
            t = time_eval(eval_modules[key], x_eval, device)
            if timed:
                eval_times[key].append(t)
        if args.verbose:
            print(f"  {h}x{w}: round {r + 1}/{args.warmup + args.iters}{'' if timed else ' (warmup)'}",
                  file=sys.stderr, flush=True)

    train = {}
    for key in TRAIN_SETTINGS:
        train[key] = {"median_s": statistics.median(train_times[key]), "times_s": train_times[key],
                      "ratio_vs_bn": ratio_summary(train_times[key], train_times["bn"])}
    train["bcn_ws"]["ratio_vs_gn_ws"] = ratio_summary(train_times["bcn_ws"], train_times["gn_ws"])
    evals = {}
    for key in EVAL_SETTINGS:
        evals[key] = {"median_s": statistics.median(eval_times[key]), "times_s": eval_times[key],
                      "ratio_vs_frozen_bn": ratio_summary(eval_times[key], eval_times["frozen_bn"])}
    evals["bcn_ws_folded"]["ratio_vs_gn_ws"] = ratio_summary(eval_times["bcn_ws_folded"], eval_times["gn_ws"])
    evals["bcn_ws_folded"]["ratio_vs_bcn_ws"] = ratio_summary(eval_times["bcn_ws_folded"], eval_times["bcn_ws"])

    results = {"train": train, "eval": evals, "memory": memory}
    targets = []
    for key, phase, ratio_key, bound, desc in TARGETS:
        summary = results[phase][key][ratio_key]
        value = summary["median"]
        targets.append({"setting": key, "phase": phase, "ratio": ratio_key, "bound": bound,
                        "description": desc, "measured": value, "met": value <= bound,
                        # the interquartile range of the per-round ratios lies on one side of the bound
                        "conclusive": summary["p75"] <= bound or summary["p25"] > bound})
    results["targets"] = targets
    return results


def profile_shape(args, device, shape, train_modules, out_dir):
    """Writes a torch.profiler op table of two training steps per setting (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    h, w = shape
    x = torch.randn(args.batch, args.channels, h, w, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    paths = []
    for key in TRAIN_SETTINGS:
        m = train_modules[key]
        time_train(m, x, grad, device)
        with profile(activities=activities) as prof:
            for _ in range(2):
                time_train(m, x, grad, device)
        path = out_dir / f"profile_{key}_{h}x{w}.txt"
        path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30))
        paths.append(str(path))
    return paths


# ---- reporting ----------------------------------------------------------------------------

def markdown(report):
    dev = report["device"]
    cpu_extra = f", {dev['cpu_count']} cores" if dev["type"] == "cpu" else ""
    mem_desc = ("CUDA max_memory_allocated during one train step minus memory allocated before it, plus the "
                "layer's buffers" if dev["type"] == "cuda" else
                "bytes of unique storages saved for backward (saved_tensors_hooks) plus the layer's buffers")
    cfg = report["config"]
    lines = [
        "# benchmark_layers",
        "",
        f"conv 3x3 {cfg['channels']}->{cfg['channels']} (padding 1) + norm, batch {cfg['batch']}, "
        f"{cfg['iters']} timed rounds after {cfg['warmup']} warmup rounds, settings interleaved round-robin. "
        f"Device: {dev['name']} ({dev['type']}{cpu_extra}, torch {report['torch_version']}, "
        f"{dev['torch_threads']} threads).",
        "",
        "Ratios: median over rounds of the per-round ratio [interquartile range]. Train step = forward + "
        "backward (fixed random output grad, input requires grad). Eval = eval mode, no_grad. "
        f"Peak memory: {mem_desc}. Targets are judged on the median ratio; a verdict marked "
        "'IQR straddles the bound' is within this machine's noise.",
        "",
        f"Command: `{report['command']}`",
    ]
    con = report["contention"]
    if dev["type"] == "cpu":
        load = (f"; 1-min load average {con['loadavg_1min_before']:.2f} before, {con['loadavg_1min_after']:.2f} after"
                if con["loadavg_1min_before"] is not None else "")
        lines += ["", f"Timing phase: this process used {100 * con['cpu_utilisation_of_threads']:.0f}% of its "
                      f"{dev['torch_threads']} threads' CPU time{load}. At the default shapes, a share well "
                      "below 100% or a load above the thread count means other processes shared the cores."]
    for shape_key, res in report["results"].items():
        train, evals, mem = res["train"], res["eval"], res["memory"]
        target_of = {t["setting"]: t for t in res["targets"]}
        lines += ["", f"## {cfg['batch']}x{cfg['channels']}x{shape_key}", "",
                  TABLE_HEADER, "|---|---|---|---|---|---|"]
        rows = [("bn", "bn", "frozen_bn"), ("frozen_bn", "frozen_bn", "frozen_bn"), ("gn", "gn", "gn"),
                ("gn_ws", "gn_ws", "gn_ws"), ("bn_wgrad", "bn_wgrad", None), ("cbn", "cbn", "cbn"), ("mabn", "mabn", "mabn"),
                ("bcn_ws", "bcn_ws", "bcn_ws"), ("cbn_folded", None, "cbn_folded"),
                ("mabn_folded", None, "mabn_folded"), ("bcn_ws_folded", None, "bcn_ws_folded")]
        for key, train_key, eval_key in rows:
            label = LABELS[key]
            if key == "bn":
                label += " (eval = FrozenBN eval)"
            if train_key is None:
                t_cell = m_cell = "-"
            else:
                t_cell = fmt_summary(train[train_key]["ratio_vs_bn"])
                if key == "bcn_ws":
                    t_cell += f"; vs GN+WS {fmt_summary(train[key]['ratio_vs_gn_ws'])}"
                m_cell = f"{mem[train_key]['ratio_vs_bn']:.3f}"
            e_cell = "-" if eval_key is None else fmt_summary(evals[eval_key]["ratio_vs_frozen_bn"])
            if key == "bcn_ws_folded":
                e_cell += f"; vs GN+WS eval {fmt_summary(evals[key]['ratio_vs_gn_ws'])}"
            if key in target_of:
                t = target_of[key]
                target = t["description"]
                met = "yes" if t["met"] else f"**no** ({t['measured']:.3f})"
                if not t["conclusive"]:
                    met += " (IQR straddles the bound)"
            else:
                target, met = ("reference" if key == "bn" else "-"), "-"
            lines.append(f"| {label} | {t_cell} | {m_cell} | {e_cell} | {target} | {met} |")
        bn_t, fz_e = train["bn"]["median_s"], evals["frozen_bn"]["median_s"]
        lines += ["", f"Absolute medians on {dev['name']}: conv+BN train step {bn_t * 1e3:.1f} ms, "
                      f"conv+FrozenBN eval {fz_e * 1e3:.1f} ms; conv+BN memory metric "
                      f"{mem['bn']['metric_bytes'] / 2**20:.1f} MiB."]
    return "\n".join(lines) + "\n"


def parse_shapes(text):
    shapes = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}; expected HxW, e.g. 100x152")
        if h < 1 or w < 1:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}")
        shapes.append((h, w))
    return shapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("100x152,50x76"),
                        help="comma-separated HxW spatial sizes (default 100x152,50x76)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--groups", type=int, default=32, help="groups of GN and BCN (default 32)")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per shape before timing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("output/benchmark_layers"))
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler op tables of each train setting (first shape)")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.channels < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch, --channels, --iters must be >= 1 and --warmup >= 0")
    if args.channels % args.groups:
        parser.error(f"--groups {args.groups} must divide --channels {args.channels}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    torch.set_num_threads(available_cores())
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    train_modules = {k: build_train_module(k, args.channels, args.groups) for k in TRAIN_SETTINGS}
    gen = torch.Generator().manual_seed(7)
    x_small = torch.randn(args.batch, args.channels, 8, 8, generator=gen)
    g_small = torch.randn(x_small.shape, generator=gen)
    prime(train_modules, x_small.requires_grad_(True), g_small)
    for m in train_modules.values():
        m.to(device)
    eval_modules = build_eval_modules(train_modules)
    h0, w0 = args.shapes[0]
    x_check = torch.randn(args.batch, args.channels, min(h0, 24), min(w0, 24), generator=gen).to(device)
    fold_check = check_folding(eval_modules, x_check)

    results = {}
    load_before, cpu0, wall0 = loadavg(), time.process_time(), time.perf_counter()
    for shape in args.shapes:
        if args.verbose:
            print(f"shape {shape[0]}x{shape[1]}", file=sys.stderr, flush=True)
        results[f"{shape[0]}x{shape[1]}"] = benchmark_shape(args, device, shape, train_modules, eval_modules)
    # A shared machine shows up as this process getting much less than its threads' worth of CPU.
    contention = {"loadavg_1min_before": load_before, "loadavg_1min_after": loadavg(),
                  "process_cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}
    contention["cpu_utilisation_of_threads"] = (contention["process_cpu_s"]
                                                / (contention["wall_s"] * torch.get_num_threads()))
    profiles = profile_shape(args, device, args.shapes[0], train_modules, args.out) if args.profile else []

    report = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        "argv": sys.argv,
        "device": device_info(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "config": {"shapes": [list(s) for s in args.shapes], "batch": args.batch, "channels": args.channels,
                   "groups": args.groups, "iters": args.iters, "warmup": args.warmup,
                   "cbn_window_size": CBN_WINDOW, "mabn_buffer_size": MABN_BUFFER, "bcn_update_rate": BCN_RATE},
        "settings": {k: LABELS[k] for k in LABELS},
        "train_settings": list(TRAIN_SETTINGS),
        "eval_settings": list(EVAL_SETTINGS),
        "memory_metric": ("cuda_step_peak_bytes + buffer_bytes" if device.type == "cuda"
                          else "saved_bytes (unique storages saved for backward) + buffer_bytes"),
        "timing": "train: forward+backward with a fixed random grad; eval: no_grad; per-round ratios, median",
        "fold_check": fold_check,
        "contention": contention,
        "results": results,
        "profiles": profiles,
        "runtime_s": time.perf_counter() - start,
    }
    (args.out / "benchmark_layers.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    md = markdown(report)
    (args.out / "benchmark_layers.md").write_text(md)
    print(md)
    print(f"runtime {report['runtime_s']:.1f} s; wrote {args.out / 'benchmark_layers.json'} and "
          f"{args.out / 'benchmark_layers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
