"""Pieces shared by every norm layer: argument checks, the per-channel affine map,
empty-input handling, freezing, loading BN checkpoints, reading checkpoints of the layer's own
layout, the training-step counter and the training step's place under torch.compile."""
import functools
import logging
import math

import torch
from torch import nn

logger = logging.getLogger("d2_smallbn.layers")


def int_problem(value, minimum):
    """None if ``value`` is an integer >= ``minimum`` (not a bool), else what a valid value is."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    return None if ok else f"an integer >= {minimum}"


def number_problem(value, low, high=math.inf, low_open=False, high_open=False):
    """None if ``value`` is a finite number in the interval (bools are not numbers), else what a valid value is."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high):
        return None
    if high == math.inf:
        return f"a finite number {'>' if low_open else '>='} {low}"
    return f"a finite number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_int(name, value, minimum):
    problem = int_problem(value, minimum)
    if problem:
        raise ValueError(f"{name} must be {problem}, got {value!r}")
    return value


def check_float(name, value, low, high, low_open=False, high_open=False):
    problem = number_problem(value, low, high, low_open, high_open)
    if problem:
        raise ValueError(f"{name} must be {problem}, got {value!r}")
    return float(value)


def stat_dtype(module):
    """Statistics are computed in float32, or float64 when the module itself is float64."""
    for buf in module.buffers():
        if buf.is_floating_point():
            return torch.float64 if buf.dtype == torch.float64 else torch.float32
    return torch.float32


def batch_mean_var(x, dtype):
    """Per-channel mean and biased variance over (N, H, W), computed in ``dtype``; one fused pass."""
    return torch.batch_norm_update_stats(x.to(dtype), None, None, 0.0)


def full_precision(tensor):
    """Context that turns autocast off on ``tensor``'s device: matmuls on statistics (einsum,
    projections) must not drop to fp16."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def channel_affine(x, scale, shift):
    """x * scale + shift with per-channel (length C) scale and shift, in x's dtype, one pass."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift = scale.to(x.dtype).view(shape), shift.to(x.dtype).view(shape)
    if torch.is_grad_enabled() and (scale.requires_grad or shift.requires_grad):
        return x * scale + shift  # addcmul's backward costs three full-size products
    return torch.addcmul(shift, x, scale)


def empty_output(x, weight, bias, *other_params):
    """Output for an input with no elements: empty, but connected to the layer's parameters so
    that they receive (zero) gradients, as DDP expects from every parameter."""
    out = x.clone() if weight is None else channel_affine(x, weight, bias)
    for p in other_params:
        out = out + 0.0 * p.sum()
    return out


def outside_compiled_graphs(when="training"):
    """Decorator of a norm's ``forward`` whose call depends on Python state: under ``torch.compile``,
    such a call runs eagerly, outside the compiled graph (a deliberate graph break). ``when``:
    "training" (the layers: their training step reads and advances Python ints and flags) or
    "always" (a module whose every call depends on a Python counter).

    Why: dynamo bakes the Python attributes it reads from a module into the graph. On torch 2.3 it
    does not even guard them when the traced frame only reads them, so a compiled CBN kept the
    iteration-0 path with an empty window for ever (plain BN); where it does guard them, a counter
    that moves every iteration recompiles the whole model each step until the recompile limit. The
    state (``_steps``, ``_num_stored``, ring slots, ``frozen``, warn-once flags) is therefore read
    only in eager code, where it is current; the layers' autograd functions (MABN writes its Psi ring
    in backward) run eagerly with it. Eval reads no Python state and compiles as usual.

    Eager cost: one ``torch.compiler.is_compiling()`` call per forward; no host sync, no tensor op.
    """
    if when not in ("training", "always"):
        raise ValueError(f"when must be 'training' or 'always', got {when!r}")

    def decorate(forward):
        eager_forward = torch.compiler.disable(forward)

        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            if (when == "always" or self.training) and torch.compiler.is_compiling():
                return eager_forward(self, *args, **kwargs)
            return forward(self, *args, **kwargs)
        return wrapper
    return decorate


NORM_NOT_SCRIPTABLE = ("its training step keeps Python state (iteration counters, windows, update rates) and runs "
                       "custom autograd functions")


def refuse_scripting(module, reason=NORM_NOT_SCRIPTABLE):
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on every module it compiles: a layer
    TorchScript cannot express refuses there, saying what works instead, rather than failing inside
    the TorchScript compiler."""
    raise RuntimeError(
        f"torch.jit.script does not support {type(module).__name__}: {reason}, which TorchScript cannot "
        "compile. For deployment, put the model in eval mode and fold it: d2_smallbn.layers.fold_conv_norm(conv) "
        "for a conv and its norm, d2_smallbn.modeling.fold_model(model) for a detectron2 model. The folded model "
        "has plain convs (and BCN's GroupNormPerGroupAffine): it scripts, and exports with torch.jit.trace or "
        "torch.onnx.export. torch.compile supports the unfolded layers.")


REDUCED_PRECISION = (torch.float16, torch.bfloat16)
BN_STATISTICS = ("running_mean", "running_var")


def as_vector(t):
    """A tensor with at most one dimension longer than 1 as a 1-D tensor ((1, G, 1) -> (G,)), else None."""
    if t.dim() == 1:
        return t
    if sum(s > 1 for s in t.shape) <= 1:
        return t.reshape(-1)
    return None


@functools.lru_cache(maxsize=None)
def example_keys(layer_class):
    """(parameter names, state-dict keys) of a 64-channel ``layer_class`` with its default arguments."""
    layer = layer_class(64)
    return tuple(name for name, _ in layer.named_parameters()), tuple(layer.state_dict())


class CheckpointMapping:
    """One norm's checkpoint keys (leaf -> tensor, relative to the norm) read for a target norm, key by
    key: ``out`` {leaf: (tensor, how, [source leaves])}, ``dropped`` and ``unmapped`` [(source leaf,
    reason)], ``notes`` [text]. Weight conversion (``d2_smallbn.weights``) fills one per norm and reports it."""

    def __init__(self):
        self.out, self.dropped, self.unmapped, self.notes = {}, [], [], []

    def copy(self, leaf, tensor, sources=None, how="copy"):
        self.out[leaf] = (tensor, how, list(sources or [leaf]))

    def unmap(self, leaves, reason):
        self.unmapped.extend((leaf, reason) for leaf in leaves)


class NormBase(nn.Module):
    """Adds freezing: a frozen norm behaves as in eval (no statistics, no state change) even in
    training mode, and its affine parameters stop receiving gradients, the same as FrozenBN.

    Statistics stay float32 when the model is cast to float16 or bfloat16 as a whole
    (``model.to(torch.bfloat16)``, ``.half()``): the parameters take the new dtype, the float32
    buffers only the new device. (A float64 cast makes them float64.)"""

    # The optimizer's norm rule (SOLVER.WEIGHT_DECAY_NORM) applies to the parameters of modules saying so.
    norm_parameters = True

    def __init__(self):
        super().__init__()
        self.frozen = False

    def __prepare_scriptable__(self):
        refuse_scripting(self)

    def _apply(self, fn, *args, **kwargs):
        fp32 = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, *args, **kwargs)
        for name, old in fp32.items():
            new = self._buffers[name]
            if new is not None and new.dtype in REDUCED_PRECISION:
                self._buffers[name] = old.to(new.device)  # from the float32 original: nothing rounded
        return self

    def freeze(self):
        self.frozen = True
        self.requires_grad_(False)
        return self

    @property
    def uses_batch(self):
        """True when this forward computes batch statistics and updates state."""
        return self.training and not self.frozen

    def output_without_step(self, x):
        """The output of a call that takes no training step, or None when it takes one: in eval (or
        frozen) ``x * scale + shift`` from the layer's ``eval_scale_shift()``; for an input with no
        elements, ``empty_output``."""
        if not self.uses_batch:
            scale, shift = self.eval_scale_shift()
            return channel_affine(x, scale, shift)
        if x.numel() == 0:
            return empty_output(x, self.weight, self.bias)
        return None

    # Loading a BatchNorm checkpoint: the BN statistics are mapped by ``map_bn_state`` and this
    # layer's own training state (rings, windows, counters) starts fresh instead of being "missing".
    # ``convert_weights`` uses the same two methods for its targets (through the table of norms).
    own_state = ()

    @staticmethod
    def map_bn_state(state_dict, prefix):
        """Rewrites BN keys under ``prefix`` into this layer's; returns a description of the mapping."""
        state_dict.pop(prefix + "num_batches_tracked", None)
        return "running_mean/running_var kept as they are"

    @classmethod
    def loads_as_bn(cls, keys):
        """Whether a checkpoint with these keys (relative to the layer) is a BatchNorm's for it: then
        its own state starts fresh without being reported missing."""
        return "running_var" in keys and not any(k in keys for k in cls.own_state)

    @classmethod
    def missing_on_load(cls, keys):
        """The layer's keys that loading a checkpoint with ``keys`` reports as missing."""
        return [] if cls.loads_as_bn(keys) else [k for k in cls.own_state if k not in keys]

    @classmethod
    def statistics_keys(cls):
        """The keys this layer keeps a BatchNorm's running_mean/running_var as (``map_bn_state``)."""
        sample = {key: torch.ones(1) for key in BN_STATISTICS}
        cls.map_bn_state(sample, "")
        return tuple(sorted(sample))

    # Checkpoints of the layer's own layout, besides a BatchNorm's (weight conversion reads them,
    # ``d2_smallbn.weights``). By default that layout is the layer's own state when its statistics are
    # not a BatchNorm's (MABN's running_sqmean): parameters and statistics carry over, the rest of
    # ``own_state`` (rings, counters) starts fresh. A layer whose checkpoints look otherwise (BCN's
    # released ones) overrides the three methods and, if its layout holds a BatchNorm part,
    # ``own_layout_batch_prefix``: where that part lives, read as a BatchNorm checkpoint for any target.
    own_layout_batch_prefix = None

    @classmethod
    def _own_statistics(cls):
        return [key for key in cls.statistics_keys() if key not in BN_STATISTICS]

    @classmethod
    def is_own_layout(cls, keys):
        """Whether one norm's checkpoint keys (relative to the norm) are in this layer's own layout."""
        own = cls._own_statistics()
        return bool(own) and all(key in keys for key in own)

    @classmethod
    def own_layout_example(cls, channels, num_groups):
        """One norm's keys in this layer's own layout, as tensors of ones (``num_groups`` for a part with
        one value per group), or None when its checkpoints are a BatchNorm's."""
        if not cls._own_statistics():
            return None
        fresh = set(cls.own_state) - set(cls.statistics_keys())
        kept = [key for key in example_keys(cls)[1] if key not in fresh]
        return {key: torch.ones(channels) for key in kept}

    @classmethod
    def map_own_layout(cls, sub, result, name, into, num_groups):
        """Reads one norm's keys ``sub`` (leaf -> tensor) of this layer's own layout into ``result`` (a
        ``CheckpointMapping``; its BatchNorm part, if any, is already read): for a layer of this class
        when ``into`` is None, else for the norm ``into`` names, which cannot take it. ``name``: this
        norm's name in the table; ``num_groups``: the groups of a per-group part (``--num-groups``)."""
        statistics = "/".join(cls._own_statistics())
        if into is not None:
            result.unmap(sub, f"{name} keeps {statistics}, not a BatchNorm's running_mean/running_var: it "
                              f"cannot become {into}")
            return
        fresh = set(cls.own_state) - set(cls.statistics_keys())
        keys = example_keys(cls)[1]
        for leaf, tensor in sub.items():
            if leaf in fresh:
                result.dropped.append((leaf, f"{name} training state: starts fresh"))
            elif leaf in keys:
                result.copy(leaf, tensor)
            else:
                result.unmap([leaf], f"not part of {name}'s state")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        from_bn = self.loads_as_bn({k[len(prefix):] for k in state_dict if k.startswith(prefix)})
        if from_bn:
            mapping = self.map_bn_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if from_bn:
            fresh = [prefix + k for k in self.own_state if prefix + k in missing_keys]
            for key in fresh:
                missing_keys.remove(key)
            logger.info("%s: loaded BatchNorm statistics into %s (%s); fresh %s",
                        prefix.rstrip(".") or "<root>", type(self).__name__, mapping,
                        ", ".join(k[len(prefix):] for k in fresh) or "nothing")


class StepCounter(NormBase):
    """Base for layers whose behaviour depends on the training step (burn-in, warmup, windows).

    The step is a Python int, so branches on it cost no host sync, mirrored into the buffer
    ``num_steps`` so that checkpoints carry it. A trainer may drive it with ``set_iteration(i)``
    before each step; once driven, a second training call within one iteration is an error,
    because it would advance the layer's window or ring buffer twice.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._steps = 0
        self._driven = False
        self._step_pending = False

    def set_iteration(self, iteration):
        """Declares that the next training forward is the trainer's iteration ``iteration`` (0-based)."""
        self._steps = check_int("iteration", int(iteration), 0)
        self._driven = True
        self._step_pending = True

    def priming_steps(self):
        """Training steps from a fresh layer until it runs as in long training (burn-in, windows and
        warmups behind it): what a benchmark runs before it measures. 0: it does from the start."""
        return 0

    def steady(self, iteration):
        """Whether training iteration ``iteration`` (0-based: the next one) runs as in long training."""
        return True

    def _begin_step(self):
        if self._driven and not self._step_pending:
            raise RuntimeError(
                f"{type(self).__name__} was called twice in training iteration {self._steps - 1}. "
                "Each instance keeps per-iteration state (window or ring buffer), so a module shared "
                "between several inputs (e.g. one head applied to every FPN level) must use one "
                "norm instance per call site."
            )
        return self._steps

    def _end_step(self):
        self._steps += 1
        self._step_pending = False
        self.num_steps.fill_(self._steps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = int(self.num_steps)  # reading the buffer once at load time is fine
        self._step_pending = False
