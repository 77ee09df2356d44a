"""Measuring one step, shared by the benchmarks (``d2_smallbn.bench.model`` and ``.layers``): its time
with the device synchronized, the memory it saves for backward and its CUDA peak, a profiler table
of it, the round-robin order of the settings, the summary of a setting's times, and bringing the
norms to their steady state before any of it.

Pure PyTorch; no detectron2 import.
"""
import contextlib
import gc
import statistics
import time

import torch

from .common import ratio_summary
from ..norms import NORMS, resolve


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, step):
    """Seconds ``step()`` takes, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def rotated(keys, round_index):
    """The order the settings ``keys`` run in round ``round_index``: rotated by one each round, so that
    machine noise hits all of them alike."""
    shift = round_index % len(keys)
    return list(keys[shift:]) + list(keys[:shift])


def timing(times, **references):
    """A setting's timed rounds: their median, the times, and for each ``name=times`` in ``references``
    the summary of the per-round ratios to that setting (``ratio_vs_<name>``)."""
    entry = {"median_s": statistics.median(times), "times_s": times}
    entry.update({f"ratio_vs_{name}": ratio_summary(times, ref) for name, ref in references.items()})
    return entry


class SavedTensorBytes:
    """Context: the bytes of the unique storages autograd saves for backward while it is open
    (``saved_tensors_hooks``), leaving out those of the tensors ``exclude`` (a model's own parameters
    and buffers). ``bytes`` after it closes."""

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self._storages.values())


@contextlib.contextmanager
def cuda_peak(device):
    """Context yielding a dict whose ``"bytes"``, once it closes, is the peak CUDA memory allocated while it
    was open minus what was allocated before (None on other devices: nothing is measured)."""
    peak = {"bytes": None}
    if device.type != "cuda":
        yield peak
        return
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield peak
    torch.cuda.synchronize(device)
    peak["bytes"] = torch.cuda.max_memory_allocated(device) - before


@contextlib.contextmanager
def exact_float32():
    """TF32 off while open: a check comparing two differently scaled weights (folded and unfolded)
    must not have them rounded differently."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def profile_table(device, steps, row_limit, **table_options):
    """torch.profiler's table of the ops ``steps()`` runs (with the CUDA kernels on CUDA), sorted by
    self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        steps()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=row_limit, **table_options)


# ---- the steady state ----------------------------------------------------------------------------

def shortest_phases():
    """{norm name: {phase key: value}}: every iteration count a norm of the table has of its own
    (``NormSpec.phases``: warmups, burn-in, ramps) at 0, or at the phase's minimum where its setting
    refuses 0, so that a benchmark's norms reach their steady state in the fewest training steps."""
    defaults = resolve()
    shortest = {}
    for name, spec in NORMS.items():
        phases = spec.phases(defaults[name]) if spec.phases else []
        shortest[name] = {p.key: 0 if spec.settings[p.key].check(0) is None else p.minimum for p in phases}
    return {name: phases for name, phases in shortest.items() if phases}


def priming_steps(layers):
    """Training steps from fresh until every layer of ``layers`` runs as in long training: the most any
    asks for (a norm layer's ``priming_steps()``: CBN's burn-in and window, MABN's buffer and warmups)."""
    return max((m.priming_steps() for m in layers if hasattr(m, "priming_steps")), default=0)


def check_steady(layers, iteration, what):
    """Raises unless every layer of ``layers`` runs training iteration ``iteration`` (0-based) as in long
    training (its ``steady``)."""
    for m in layers:
        if hasattr(m, "steady") and not m.steady(iteration):
            raise AssertionError(f"{what}: {type(m).__name__} not yet as in long training after priming "
                                 f"(its window, warmup or burn-in: {m.priming_steps()} steps)")
