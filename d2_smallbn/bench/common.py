"""Shared pieces of the measurement tools (``d2_smallbn.bench.model``, ``.layers`` and the
studies): robust summaries of per-round ratios, device and contention
information, strict JSON output, matplotlib in headless mode, and a small synthetic image
classification task for the two studies. Measuring a step is in ``measure``, the targets in
``targets``, the command-line pieces in ``cli``.

Pure PyTorch (plus matplotlib when plotting); no detectron2 import.
"""
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

# ---- statistics -----------------------------------------------------------------------------


def summary(values):
    """Median, quartiles and range of a non-empty list of numbers."""
    values = sorted(float(v) for v in values)
    if not values:
        raise ValueError("summary of an empty list")
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "min": values[0], "max": values[-1]}


def ratio_summary(num, den):
    """Summary of the per-round ratios num[i] / den[i] (both measured in round i)."""
    if len(num) != len(den):
        raise ValueError(f"ratio of {len(num)} values to {len(den)} values")
    return summary([a / b for a, b in zip(num, den)])


def fmt_summary(s, digits=3):
    """'median [p25, p75]'."""
    return f"{s['median']:.{digits}f} [{s['p25']:.{digits}f}, {s['p75']:.{digits}f}]"



# ---- device and machine -------------------------------------------------------------------


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_info(device):
    """Device type and name (the CPU model on CPU), thread count and platform."""
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["name"] = name
        info["cpu_count"] = available_cores()
    return info


class CpuShare:
    """How much CPU this process got while timing: a share well below 100% of its threads, or a
    load average above the thread count, means other processes shared the cores."""

    def __init__(self):
        self.load_before, self.cpu0, self.wall0 = loadavg(), time.process_time(), time.perf_counter()

    def result(self):
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        return {"loadavg_1min_before": self.load_before, "loadavg_1min_after": loadavg(), "process_cpu_s": cpu,
                "wall_s": wall, "cpu_utilisation_of_threads": cpu / max(wall * torch.get_num_threads(), 1e-9)}


def contention_line(contention, device, caveat=""):
    """The report's line on CPU contention while timing ("" on other devices); ``caveat`` (e.g. "At the
    default shapes") qualifies its reading."""
    if device["type"] != "cpu":
        return ""
    load = ""
    if contention["loadavg_1min_before"] is not None:
        load = (f"; 1-min load average {contention['loadavg_1min_before']:.2f} before, "
                f"{contention['loadavg_1min_after']:.2f} after")
    reading = f"{caveat}, a share" if caveat else "A share"
    return (f"Timing phase: this process used {100 * contention['cpu_utilisation_of_threads']:.0f}% of its "
            f"{device['torch_threads']} threads' CPU time{load}. {reading} well below 100% or a load above the "
            "thread count means other processes shared the cores.")


def command_line():
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


def environment(detectron2=True):
    """The versions of torch and Python, and of detectron2 (with ``detectron2``, where it is installed)."""
    env = {"torch_version": torch.__version__, "python_version": platform.python_version()}
    if not detectron2:
        return env
    try:
        import detectron2

        env["detectron2_version"] = detectron2.__version__
    except ImportError:
        pass
    return env


# ---- output -------------------------------------------------------------------------------


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if torch.is_tensor(obj):
        return _plain(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        return obj.item()
    return obj


def write_json(path, obj):
    """Strict JSON (a NaN or infinity is an error, not a silent 'NaN')."""
    Path(path).write_text(json.dumps(_plain(obj), indent=2, allow_nan=False))


def pyplot():
    """matplotlib.pyplot with the headless Agg backend."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # no "findfont" noise
    import matplotlib.pyplot as plt

    return plt


def set_threads(threads=None):
    """torch's intra-op threads: ``threads``, or every core this process may use. On a machine
    shared with other work, 1 thread avoids the stalls of a parallel region waiting for a
    descheduled thread."""
    torch.set_num_threads(threads or available_cores())


# ---- synthetic classification task for the studies ----------------------------------------

SHAPE_CLASSES = ("disk", "square", "diamond", "cross", "ring", "bar")


# a mean foreground colour per class (RGB in [-1, 1]), for the colour cue
_CLASS_COLOURS = torch.tensor([[0.8, -0.6, -0.6], [-0.6, 0.8, -0.6], [-0.6, -0.6, 0.8],
                               [0.8, 0.8, -0.6], [0.8, -0.6, 0.8], [-0.6, 0.8, 0.8]])


def shapes_batch(n, size, generator, num_classes=len(SHAPE_CLASSES), colour_cue=0.0):
    """``n`` RGB images (n, 3, size, size) of one shape each on a noisy, randomly tinted
    background, and their labels: the shape's class. Position, scale and the background are
    independent of the class. The foreground colour is random, mixed with weight ``colour_cue``
    (0: none, 1: only) with a class colour, so that a small net learns the task within a few
    hundred batch-2 steps; the shape stays informative. Values roughly in [-1, 1].
    """
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}]")
    g = generator
    labels = torch.randint(0, num_classes, (n,), generator=g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    radius = (0.18 + 0.17 * torch.rand(n, generator=g)).view(n, 1, 1)
    cx = (radius.view(n) + (1 - 2 * radius.view(n)) * torch.rand(n, generator=g)).view(n, 1, 1)
    cy = (radius.view(n) + (1 - 2 * radius.view(n)) * torch.rand(n, generator=g)).view(n, 1, 1)
    dx, dy = (xx - cx).abs(), (yy - cy).abs()
    dist = torch.sqrt(dx * dx + dy * dy)
    masks = torch.stack([
        dist < radius,                                                              # disk
        torch.maximum(dx, dy) < radius * 0.85,                                      # square
        dx + dy < radius * 1.2,                                                     # diamond
        ((dx < radius / 3) & (dy < radius)) | ((dy < radius / 3) & (dx < radius)),  # cross
        (dist < radius) & (dist > radius * 0.55),                                   # ring
        (dy < radius / 3) & (dx < radius * 1.1),                                    # bar
    ], dim=1)[torch.arange(n), labels].float().unsqueeze(1)
    fg = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    if colour_cue:
        fg = (1 - colour_cue) * fg + colour_cue * _CLASS_COLOURS[labels].view(n, 3, 1, 1)
    bg = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * 0.5
    noise = torch.randn(n, 3, size, size, generator=g) * 0.25
    images = masks * fg + (1 - masks) * bg + noise
    return images, labels


def finite_or_raise(value, what):
    value = float(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}: training diverged; lower --lr")
    return value


def int_list(flag, minimum, example):
    """An argparse type for a comma-separated list of integers >= ``minimum`` (sorted, unique)."""
    import argparse

    def parse(text):
        try:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {flag} {text!r}; expected e.g. {example}")
        if not values or values[0] < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be integers >= {minimum}")
        return values

    return parse
