"""Benchmark d2_smallbn's conv+norm layers against plain-torch conv+BN / GN baselines.

Every setting is a 3x3 conv (C -> C, padding 1, no bias) followed by a norm:

    train:  BN, FrozenBN (BN in eval mode, no grad to its parameters), GN, GN+WS,
            CBN (CBNConv2d), MABN (CenteredConv2d), BCN+WS (WSConv2d)
    eval:   FrozenBN (= BN eval), GN, GN+WS, unfolded CBN / MABN / BCN+WS,
            and the folded convs of CBN, MABN (plain conv) and BCN+WS (conv + group part)

``--norms`` adds any other norm of the table of norms by its name (BRN, or one of yours registered
with ``d2_smallbn.register_norm`` in a module that ``--norm-module`` or D2_SMALLBN_NORM_MODULES names):
the norm after its conv class (a plain conv where it has none), in training, in eval and folded.
Every norm is built as the table builds it, from MODEL.SMALLBN's defaults except: its own iteration
counts (``NormSpec.phases``: CBN's burn-in, MABN's warmups) at 0, ``--groups`` for GN and for every
norm with a NUM_GROUPS setting (BCN), and a learning rate of 0.01 for the norms whose statistics
follow it (BCN's update rate).

What is measured:

- train step: forward + backward with a fixed random output gradient; the input requires grad
  (the layer sits inside a network), parameter/input grads are reset outside the timed region;
- eval step: eval mode under torch.no_grad();
- the settings are interleaved round-robin (rotated order each round), so machine noise hits all
  of them alike; every figure is the median over rounds of the per-round ratio against the
  reference measured in the same round (conv+BN for training, conv+FrozenBN eval for inference;
  BCN+WS additionally against GN+WS, and each folded conv against its unfolded layer);
- memory: on CUDA, torch.cuda.max_memory_allocated during one train step minus the memory
  allocated before it, plus the layer's buffers; on CPU, the bytes of the unique storages saved
  for backward (torch.autograd.graph.saved_tensors_hooks) plus the layer's buffers.
  Both CPU-style numbers are always in the JSON.

Before timing, every norm is primed for the training steps its layers ask for (``priming_steps()``;
so the timed steps are in the steady state: full CBN window, MABN moving averages with clipping),
and the folded convs are checked against the unfolded eval outputs. Targets: ``TARGETS["layers"]``
in ``d2_smallbn.bench.targets``.

Usage:  d2-smallbn-benchmark-layers [--shapes 100x152,50x76] [--batch 2] [--channels 256]
            [--iters 10] [--warmup 2] [--device cpu|cuda] [--out DIR] [--norms BRN,...]
            [--norm-module MODULE] [--profile]
Writes DIR/benchmark_layers.json and DIR/benchmark_layers.md and prints the markdown.
"""
import argparse
import copy
import math
import sys
import time

import torch
from torch import nn

from .cli import (add_norm_modules, add_run_arguments, begin, check_device, comma_list, height_width,
                  import_requested_norms, print_written, report_head)
from .common import CpuShare, contention_line, fmt_summary, write_json
from .measure import (SavedTensorBytes, check_steady, cuda_peak, exact_float32, priming_steps, profile_table,
                      rotated, shortest_phases, timed, timing)
from .targets import TARGETS, verdict
from ..layers import NormActConv2d, WSConv2d, fold_conv_norm
from ..norms import NORMS, conv_kwargs, resolve

BASELINES_TRAIN = ("bn", "frozen_bn", "gn", "gn_ws", "bn_wgrad")
BASELINES_EVAL = ("frozen_bn", "gn", "gn_ws")
DEFAULT_NORMS = {"cbn": "CBN", "mabn": "MABN", "bcn_ws": "BCN"}  # the norms measured by default: setting -> norm
TRAIN_SETTINGS = BASELINES_TRAIN + tuple(DEFAULT_NORMS)
EVAL_SETTINGS = BASELINES_EVAL + tuple(DEFAULT_NORMS) + tuple(f"{k}_folded" for k in DEFAULT_NORMS)
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
# Settings also compared with others than the reference, shown beside it as "vs <short name>".
ALSO_COMPARED = {"bcn_ws": ("gn_ws",), "bcn_ws_folded": ("gn_ws",)}
SHORT_NAMES = {"gn_ws": "GN+WS"}
EVAL_COPY_OF = {"frozen_bn": "bn"}  # eval settings that are another training module in eval (FrozenBN: BN)
EVAL_ROW = {train: key for key, train in EVAL_COPY_OF.items()}  # the markdown row of conv+BN shows FrozenBN's eval
LEARNING_RATE = 0.01  # what the norms whose statistics follow the learning rate get (BCN's update rate)
TABLE_HEADER = "| setting | train step ratio vs BN | peak mem ratio vs BN | eval ratio vs FrozenBN | target | met? |"


class _ConvWithExtraWeightGrad(nn.Conv2d):
    """conv plus the one extra weight-gradient convolution CBN needs per step (d nu / dW): what
    any exact CBN pays on top of BN, measured here to show the floor on this device."""

    def forward(self, x):
        y = super().forward(x)
        with torch.no_grad():
            torch.nn.grad.conv2d_weight(x, self.weight.shape, y, self.stride, self.padding, self.dilation, self.groups)
        return y


# ---- the settings -------------------------------------------------------------------------

def measured_norms(parser, names):
    """{setting key: norm name}: the default ones plus the table's norms ``names`` (``--norms``)."""
    norms = dict(DEFAULT_NORMS)
    for name in (n.upper() for n in names):
        if name not in NORMS:
            parser.error(f"--norms: no norm {name!r} in the table of norms ({', '.join(NORMS)}); a norm of yours: "
                         "register it in a module and name that module with --norm-module")
        if name in norms.values():
            continue
        key = name.lower()
        if key in TRAIN_SETTINGS or key in EVAL_SETTINGS:
            parser.error(f"--norms {name}: its setting name {key!r} is a built-in setting's; register the norm "
                         "under another name")
        norms[key] = name
    return norms


def train_settings(norms):
    return BASELINES_TRAIN + tuple(norms)


def eval_settings(norms):
    return BASELINES_EVAL + tuple(norms) + tuple(f"{k}_folded" for k in norms)


def label(key, norms):
    if key in LABELS:
        return LABELS[key]
    if key.endswith("_folded"):
        return f"{norms[key[:-len('_folded')]]} folded (eval only)"
    conv = NORMS[norms[key]].conv
    return f"{norms[key]} ({conv.__name__ if conv else 'plain conv'})"


def resolved_settings(groups):
    """The resolved MODEL.SMALLBN settings the norms are built from (see the module's docstring)."""
    values = shortest_phases()
    for name, spec in NORMS.items():
        if "NUM_GROUPS" in spec.settings:
            values.setdefault(name, {})["NUM_GROUPS"] = groups
    return resolve(values, base_lr=LEARNING_RATE)


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


def _norm_module(name, c, settings, conv_options):
    """A conv feeding the table's norm ``name``, both built as the table builds them (the norm's conv class,
    or a plain conv carrying it)."""
    spec = NORMS[name]
    conv = spec.conv or NormActConv2d
    return conv(c, c, norm=spec.build(c, settings), **conv_options, **conv_kwargs(conv, settings))


def build_train_module(key, channels, groups, norms, settings, seed=0):
    """The training-mode module of a setting (on CPU); all settings share the same conv weight."""
    c = channels
    conv_options = dict(kernel_size=3, padding=1, bias=False)
    if key in norms:
        module = _norm_module(norms[key], c, settings, conv_options)
    elif key in ("bn", "frozen_bn"):
        module = nn.Sequential(nn.Conv2d(c, c, **conv_options), nn.BatchNorm2d(c))
    elif key == "bn_wgrad":
        module = nn.Sequential(_ConvWithExtraWeightGrad(c, c, **conv_options), nn.BatchNorm2d(c))
    elif key == "gn":
        module = nn.Sequential(nn.Conv2d(c, c, **conv_options), nn.GroupNorm(groups, c))
    elif key == "gn_ws":
        module = WSConv2d(c, c, norm=nn.GroupNorm(groups, c), **conv_options)
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
    """Runs training steps on a small input until every norm runs as in long training (the most steps any
    layer asks for, the same number for every module), i.e. in the steady state the timed steps measure."""
    steps = priming_steps([layer for module in modules.values() for layer in module.modules()])
    for key, module in modules.items():
        for _ in range(steps):
            _train_step(module, x_small, grad_small)
            _clear_grads(module, x_small)
        check_steady(list(module.modules()), steps, key)


def build_eval_modules(train_modules, norms):
    """Eval-mode copies of the primed training modules, plus the folded convs."""
    evals = {}
    for key in eval_settings(norms):
        if key.endswith("_folded"):
            evals[key] = fold_conv_norm(evals[key[:-len("_folded")]])
        else:
            evals[key] = copy.deepcopy(train_modules[EVAL_COPY_OF.get(key, key)]).eval()
    for m in evals.values():
        m.requires_grad_(False)
    return evals


@torch.no_grad()
def check_folding(evals, x, norms):
    """The folded conv's eval output must equal the unfolded eval output (TF32 off for the check,
    since it would round the two differently-scaled weights differently), and the folded conv keeps
    no norm but what the norm leaves unfolded (its ``unfolded_part()``: BCN's group part)."""
    with exact_float32():
        return {key: _check_folded(key, evals[key], evals[key + "_folded"], x) for key in norms}


def _check_folded(key, unfolded, folded, x):
    ref, out = unfolded(x), folded(x)
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * max(scale, 1.0)):
        raise AssertionError(f"folded {key} differs from unfolded eval: max abs err {err:.3g} "
                             f"(max |ref| {scale:.3g})")
    norm = unfolded.norm
    left = type(norm.unfolded_part()) if hasattr(norm, "unfolded_part") else None
    kept = type(folded.norm) if folded.norm is not None else None
    if kept is not left:
        raise AssertionError(f"folded {key} keeps {kept.__name__ if kept else 'no norm'}, but "
                             f"{type(norm).__name__} leaves {left.__name__ if left else 'nothing'} unfolded: "
                             "fold_conv_norm folds a norm with eval_scale_shift() or BN's running statistics")
    return {"max_abs_err": err, "max_abs_ref": scale}


# ---- measurement --------------------------------------------------------------------------

def time_train(module, x, grad, device):
    _clear_grads(module, x)
    return timed(device, lambda: _train_step(module, x, grad))


def time_eval(module, x, device):
    def step():
        with torch.no_grad():
            module(x)
    return timed(device, step)


def buffer_bytes(module):
    return sum(b.numel() * b.element_size() for b in module.buffers())


def saved_tensor_bytes(module, x, grad):
    """Bytes of the unique storages autograd saves for backward during one training forward."""
    _clear_grads(module, x)
    with SavedTensorBytes() as saved:
        out = module(x)
    out.backward(grad)
    _clear_grads(module, x)
    return saved.bytes


def cuda_step_peak_bytes(module, x, grad, device):
    _clear_grads(module, x)
    with cuda_peak(device) as peak:
        _train_step(module, x, grad)
    _clear_grads(module, x)
    return peak["bytes"]


def measure_memory(train_modules, x, grad, device):
    """One untimed step of each training module: its memory, and the ratio to conv+BN's."""
    memory = {}
    for key, m in train_modules.items():
        entry = {"saved_bytes": saved_tensor_bytes(m, x, grad), "buffer_bytes": buffer_bytes(m)}
        entry["saved_plus_buffers_bytes"] = entry["saved_bytes"] + entry["buffer_bytes"]
        if device.type == "cuda":
            entry["cuda_step_peak_bytes"] = cuda_step_peak_bytes(m, x, grad, device)
            entry["metric_bytes"] = entry["cuda_step_peak_bytes"] + entry["buffer_bytes"]
        else:
            entry["metric_bytes"] = entry["saved_plus_buffers_bytes"]
        memory[key] = entry
    for entry in memory.values():
        entry["ratio_vs_bn"] = entry["metric_bytes"] / memory["bn"]["metric_bytes"]
    return memory


def time_rounds(args, device, train_modules, eval_modules, x, grad, shape_key):
    """The timed rounds at one shape (after the warmup rounds), round-robin: {setting: [seconds]} for
    training and for eval."""
    train_times = {k: [] for k in train_modules}
    eval_times = {k: [] for k in eval_modules}
    x_eval = x.detach()
    for r in range(args.warmup + args.iters):
        timed_round = r >= args.warmup
        for key in rotated(list(train_modules), r):
            t = time_train(train_modules[key], x, grad, device)
            if timed_round:
                train_times[key].append(t)
        for key in rotated(list(eval_modules), r):
            t = time_eval(eval_modules[key], x_eval, device)
            if timed_round:
                eval_times[key].append(t)
        if args.verbose:
            print(f"  {shape_key}: round {r + 1}/{args.warmup + args.iters}{'' if timed_round else ' (warmup)'}",
                  file=sys.stderr, flush=True)
    return train_times, eval_times


def _compared(times, key, reference):
    """The times of the settings ``key`` is compared with: its reference, ALSO_COMPARED's, and for a folded
    conv its unfolded layer."""
    others = (reference,) + ALSO_COMPARED.get(key, ())
    if key.endswith("_folded"):
        others += (key[:-len("_folded")],)
    return {other: times[other] for other in others}


def benchmark_shape(args, device, shape, train_modules, eval_modules):
    h, w = shape
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, args.channels, h, w, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(args.batch, args.channels, h, w, generator=gen).to(device)
    memory = measure_memory(train_modules, x, grad, device)
    train_times, eval_times = time_rounds(args, device, train_modules, eval_modules, x, grad, f"{h}x{w}")
    results = {"train": {k: timing(t, **_compared(train_times, k, "bn")) for k, t in train_times.items()},
               "eval": {k: timing(t, **_compared(eval_times, k, "frozen_bn")) for k, t in eval_times.items()},
               "memory": memory}
    targets = []
    for t in TARGETS["layers"]:
        judged = verdict(t, results, device.type)
        targets.append({"setting": t.setting, "phase": t.section, "ratio": t.ratio, "bound": judged["bound"],
                        "description": t.describe(judged["bound"]), "measured": judged["measured"],
                        "met": judged["met"], "conclusive": judged["conclusive"]})
    results["targets"] = targets
    return results


def profile_shape(args, device, shape, train_modules, out_dir):
    """Writes a torch.profiler op table of two training steps per setting (``--profile``)."""
    h, w = shape
    x = torch.randn(args.batch, args.channels, h, w, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    paths = []
    for key, m in train_modules.items():
        time_train(m, x, grad, device)
        table = profile_table(device, lambda: [time_train(m, x, grad, device) for _ in range(2)], row_limit=30)
        path = out_dir / f"profile_{key}_{h}x{w}.txt"
        path.write_text(table)
        paths.append(str(path))
    return paths


# ---- reporting ----------------------------------------------------------------------------

def _row(key, train_key, eval_key, res, cfg_label, target_of):
    train, evals, mem = res["train"], res["eval"], res["memory"]
    label_text = cfg_label + (" (eval = FrozenBN eval)" if key in EVAL_ROW else "")
    if train_key is None:
        t_cell = m_cell = "-"
    else:
        t_cell = fmt_summary(train[train_key]["ratio_vs_bn"])
        for other in ALSO_COMPARED.get(key, ()):
            t_cell += f"; vs {SHORT_NAMES[other]} {fmt_summary(train[key][f'ratio_vs_{other}'])}"
        m_cell = f"{mem[train_key]['ratio_vs_bn']:.3f}"
    e_cell = "-" if eval_key is None else fmt_summary(evals[eval_key]["ratio_vs_frozen_bn"])
    if train_key is None:
        for other in ALSO_COMPARED.get(key, ()):
            e_cell += f"; vs {SHORT_NAMES[other]} eval {fmt_summary(evals[key][f'ratio_vs_{other}'])}"
    if key in target_of:
        t = target_of[key]
        target = t["description"]
        met = "yes" if t["met"] else f"**no** ({t['measured']:.3f})"
        if not t["conclusive"]:
            met += " (IQR straddles the bound)"
    else:
        target, met = ("reference" if key == "bn" else "-"), "-"
    return f"| {label_text} | {t_cell} | {m_cell} | {e_cell} | {target} | {met} |"


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
    line = contention_line(report["contention"], dev, caveat="At the default shapes")
    if line:
        lines += ["", line]
    train_keys, eval_keys = report["train_settings"], report["eval_settings"]
    rows = [(k, k, EVAL_ROW.get(k, k if k in eval_keys else None)) for k in train_keys]
    rows += [(k, None, k) for k in eval_keys if k not in train_keys]
    for shape_key, res in report["results"].items():
        target_of = {t["setting"]: t for t in res["targets"]}
        lines += ["", f"## {cfg['batch']}x{cfg['channels']}x{shape_key}", "", TABLE_HEADER, "|---|---|---|---|---|---|"]
        lines += [_row(key, train_key, eval_key, res, report["settings"][key], target_of)
                  for key, train_key, eval_key in rows]
        bn_t, fz_e, mem = res["train"]["bn"]["median_s"], res["eval"]["frozen_bn"]["median_s"], res["memory"]
        lines += ["", f"Absolute medians on {dev['name']}: conv+BN train step {bn_t * 1e3:.1f} ms, "
                      f"conv+FrozenBN eval {fz_e * 1e3:.1f} ms; conv+BN memory metric "
                      f"{mem['bn']['metric_bytes'] / 2**20:.1f} MiB."]
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------------

def parse_shapes(text):
    return [height_width(part, "shape", "100x152") for part in text.split(",")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("100x152,50x76"),
                        help="comma-separated HxW spatial sizes (default 100x152,50x76)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--groups", type=int, default=32,
                        help="groups of GN and of every norm with a NUM_GROUPS setting, BCN (default 32)")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per shape before timing")
    add_run_arguments(parser, out="output/benchmark_layers", threads=False)
    parser.add_argument("--norms", type=comma_list, default=[],
                        help="more norms of the table to measure, by name (e.g. BRN, or one of yours: "
                             "--norm-module)")
    add_norm_modules(parser)
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler op tables of each train setting (first shape)")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.channels < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch, --channels, --iters must be >= 1 and --warmup >= 0")
    if args.channels % args.groups:
        parser.error(f"--groups {args.groups} must divide --channels {args.channels}")
    check_device(parser, args)
    import_requested_norms(parser, args)
    args.norms = measured_norms(parser, args.norms)
    return args


def main(argv=None):
    args = parse_args(argv)
    device, start = begin(args)
    norms, settings = args.norms, resolved_settings(args.groups)
    train_modules = {k: build_train_module(k, args.channels, args.groups, norms, settings)
                     for k in train_settings(norms)}
    gen = torch.Generator().manual_seed(7)
    x_small = torch.randn(args.batch, args.channels, 8, 8, generator=gen)
    g_small = torch.randn(x_small.shape, generator=gen)
    prime(train_modules, x_small.requires_grad_(True), g_small)
    for m in train_modules.values():
        m.to(device)
    eval_modules = build_eval_modules(train_modules, norms)
    h0, w0 = args.shapes[0]
    x_check = torch.randn(args.batch, args.channels, min(h0, 24), min(w0, 24), generator=gen).to(device)
    fold_check = check_folding(eval_modules, x_check, norms)

    results = {}
    share = CpuShare()  # a shared machine shows up as this process getting much less than its threads' worth
    for shape in args.shapes:
        if args.verbose:
            print(f"shape {shape[0]}x{shape[1]}", file=sys.stderr, flush=True)
        results[f"{shape[0]}x{shape[1]}"] = benchmark_shape(args, device, shape, train_modules, eval_modules)
    contention = share.result()
    profiles = profile_shape(args, device, args.shapes[0], train_modules, args.out) if args.profile else []

    report = {
        **report_head(device, detectron2=False),
        "config": {"shapes": [list(s) for s in args.shapes], "batch": args.batch, "channels": args.channels,
                   "groups": args.groups, "iters": args.iters, "warmup": args.warmup,
                   "norm_settings": {name: settings[name] for name in norms.values()},
                   "learning_rate": LEARNING_RATE},
        "settings": {k: label(k, norms) for k in dict.fromkeys(list(train_modules) + list(eval_modules))},
        "train_settings": list(train_modules),
        "eval_settings": list(eval_modules),
        "memory_metric": ("cuda_step_peak_bytes + buffer_bytes" if device.type == "cuda"
                          else "saved_bytes (unique storages saved for backward) + buffer_bytes"),
        "timing": "train: forward+backward with a fixed random grad; eval: no_grad; per-round ratios, median",
        "fold_check": fold_check,
        "contention": contention,
        "results": results,
        "profiles": profiles,
    }
    report["runtime_s"] = time.perf_counter() - start
    json_path, md_path = args.out / "benchmark_layers.json", args.out / "benchmark_layers.md"
    write_json(json_path, report)
    md = markdown(report)
    md_path.write_text(md)
    print(md)
    print_written(report["runtime_s"], (json_path, md_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
