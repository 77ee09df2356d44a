"""Norm names "CBN", "MABN", "BCN" for detectron2, and the one conversion pass that gives every
normed conv its matching conv class.

detectron2 builds norms with ``get_norm(name, channels)`` and passes them to its ``Conv2d``. The
factories here read the hyper-parameters of the config being built (``building(cfg)``), and
``convert_model`` then swaps each normed conv for the matching class (CBN -> CBNConv2d bound to its
norm, MABN -> CenteredConv2d, BCN -> WSConv2d), sets MABN warmups by scope and freezes the norms
of frozen stages.
"""
import contextlib
import logging
import math

import torch
from torch import nn

from ..config import CONV_TYPES, SMALLBN_NORMS, add_smallbn_config
from ..layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                      MovingAverageBatchNorm2d, NormActConv2d, WSConv2d)

logger = logging.getLogger(__name__)

SMALLBN_NORM_TYPES = (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, BatchChannelNorm2d)
_active_cfgs = []


@contextlib.contextmanager
def building(cfg):
    """Norms created by name inside this context take their hyper-parameters from ``cfg``."""
    _active_cfgs.append(cfg)
    try:
        yield
    finally:
        _active_cfgs.pop()


def _settings():
    if _active_cfgs and "SMALLBN" in _active_cfgs[-1].MODEL:
        return _active_cfgs[-1]
    from detectron2.config import get_cfg

    return add_smallbn_config(get_cfg())


def build_norm(name, channels, cfg=None):
    """One of our norms by name, configured from ``cfg`` (default: the config being built)."""
    cfg = cfg or _settings()
    s = cfg.MODEL.SMALLBN
    if name == "CBN":
        c = s.CBN
        return CrossIterationBatchNorm2d(channels, window_size=c.WINDOW_SIZE, burnin_iters=c.BURNIN_ITERS,
                                         rho=c.RHO, eps=c.EPS, momentum=c.MOMENTUM)
    if name == "MABN":
        m = s.MABN
        return MovingAverageBatchNorm2d(channels, momentum=m.MOMENTUM, buffer_size=m.BUFFER_SIZE,
                                        warmup_iters=m.WARMUP_ITERS, clip_lambda=m.CLIP_LAMBDA,
                                        clip_warmup_iters=m.CLIP_WARMUP_ITERS, eps=m.EPS)
    if name == "BCN":
        if isinstance(channels, int) and channels >= 1 and channels % s.BCN.NUM_GROUPS:
            problem = f"MODEL.SMALLBN.BCN.NUM_GROUPS = {s.BCN.NUM_GROUPS} does not divide the {channels} channels"
            if _active_cfgs:  # inside build_model: the conversion pass names every such layer
                return UnfitNorm(channels, problem)
            raise ValueError(f"{problem} of this BCN layer. Fix: a NUM_GROUPS that divides the channels")
        norm = BatchChannelNorm2d(channels, num_groups=s.BCN.NUM_GROUPS, eps=s.BCN.EPS)
        rate = cfg.SOLVER.BASE_LR if s.BCN.UPDATE_RATE_MODE == "lr" else s.BCN.UPDATE_RATE
        norm.set_update_rate(float(rate))  # never silently GN: start at the base LR
        return norm
    raise KeyError(name)


class UnfitNorm(nn.Module):
    """Stands in for a norm whose settings do not fit its layer (BCN groups that do not divide the
    channels), so that the conversion pass can name every such layer and the config key at once."""

    def __init__(self, num_features, problem):
        super().__init__()
        self.num_features, self.problem = num_features, problem

    def forward(self, *args):
        raise ValueError(self.problem)


def _refuse_unfit_norms(model, cfg, prefix):
    unfit = [(prefix + name, m) for name, m in model.named_modules() if isinstance(m, UnfitNorm)]
    if not unfit:
        return
    groups = cfg.MODEL.SMALLBN.BCN.NUM_GROUPS
    channels = [m.num_features for _, m in unfit] + [m.num_features for m in model.modules()
                                                      if isinstance(m, BatchChannelNorm2d)]
    common = math.gcd(*channels)
    divisors = [d for d in range(min(common, groups), 0, -1) if common % d == 0][:4]
    listed = ", ".join(f"{name} ({m.num_features} channels)" for name, m in unfit[:6])
    raise ValueError(
        f"MODEL.SMALLBN.BCN.NUM_GROUPS = {groups} does not divide the channels of {len(unfit)} BCN layer(s): {listed}"
        + (", ..." if len(unfit) > 6 else "") + ". Fix: set MODEL.SMALLBN.BCN.NUM_GROUPS to a divisor of every BCN "
        f"layer's channels (here: {', '.join(map(str, divisors))}), or change those layers' channels")


class PerLevelNorm(nn.Module):
    """One norm instance per FPN level for a conv shared across levels (RetinaNet's head):
    call i uses norm i mod L, so each instance sees one level once per iteration."""

    def __init__(self, norms):
        super().__init__()
        self.norms = nn.ModuleList(norms)
        self.needs_conv_input = getattr(norms[0], "needs_conv_input", False)
        self._next = 0

    def attach(self, *args):
        for norm in self.norms:
            norm.attach(*args)

    def forward(self, y, *conv_inputs):
        norm = self.norms[self._next]
        self._next = (self._next + 1) % len(self.norms)
        return norm(y, *conv_inputs)


def _kind(norm):
    if isinstance(norm, PerLevelNorm):
        return _kind(norm.norms[0])
    for name, cls in zip(SMALLBN_NORMS, SMALLBN_NORM_TYPES):
        if isinstance(norm, cls):
            return name
    return None


def conv_class_for(norm, conv_type="auto"):
    """The conv class a conv feeding ``norm`` must have, or None to keep the conv as it is."""
    if conv_type not in CONV_TYPES:
        raise ValueError(f"conv type must be one of {CONV_TYPES}, got {conv_type!r}")
    kind = _kind(norm)
    if kind == "CBN":
        if conv_type in ("ws", "centered"):
            raise ValueError(f"CBN needs its own conv (CBNConv2d); MODEL.SMALLBN.CONV={conv_type!r} is not supported")
        return CBNConv2d
    if conv_type == "auto":
        return {"MABN": CenteredConv2d, "BCN": WSConv2d}.get(kind)
    return {"ws": WSConv2d, "centered": CenteredConv2d, "plain": None}[conv_type]


def _rebuild_conv(conv, cls, norm, activation, cfg):
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  padding_mode=conv.padding_mode, norm=norm, activation=activation,
                  device=conv.weight.device, dtype=conv.weight.dtype)
    # A conv bias before CBN is cancelled by the normalization, so it is dropped (d2 inits it to 0).
    keep_bias = conv.bias is not None and cls is not CBNConv2d
    if cls is WSConv2d:
        kwargs.update(ws_eps=cfg.MODEL.SMALLBN.WS.EPS, ws_mode=cfg.MODEL.SMALLBN.WS.MODE)
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, bias=keep_bias, **kwargs)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if keep_bias:
            new.bias.copy_(conv.bias)
            new.bias.requires_grad_(conv.bias.requires_grad)
    new.train(conv.training)
    return new


def replace_module(parent, name, new):
    """``setattr(parent, name, new)``, also in the plain Python lists that some detectron2 modules
    keep next to their registered children (FPN's ``lateral_convs`` and ``output_convs``)."""
    old = getattr(parent, name)
    setattr(parent, name, new)
    for value in vars(parent).values():
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new


def _scope(module_name, has_bottom_up):
    if module_name.startswith("backbone."):
        if not has_bottom_up or module_name.startswith("backbone.bottom_up."):
            return "backbone"
        return "fpn"
    return "heads"


def convert_model(model, cfg=None, prefix=""):
    """The conversion pass (idempotent). Returns ``model``, changed in place.

    ``prefix`` is ``model``'s name inside the full detector (e.g. "backbone."), for the MABN
    warmup scopes when a part is converted on its own.
    """
    cfg = cfg or _settings()
    s = cfg.MODEL.SMALLBN
    _refuse_unfit_norms(model, cfg, prefix)
    _split_retinanet_norms(model, cfg)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and getattr(child, "norm", None) is not None:
                cls = conv_class_for(child.norm, s.CONV)
                if cls is not None and type(child) is not cls:
                    replace_module(parent, child_name, _rebuild_conv(child, cls, child.norm, child.activation, cfg))
    backbone = model if prefix == "backbone." else getattr(model, "backbone", None)
    has_bottom_up = hasattr(backbone, "bottom_up")
    warmups = {"backbone": s.MABN.WARMUP_ITERS, "fpn": s.MABN.FPN_WARMUP_ITERS, "heads": s.MABN.HEADS_WARMUP_ITERS}
    for name, module in model.named_modules():
        if isinstance(module, SMALLBN_NORM_TYPES):
            guard = module.__dict__.pop("_unconverted", None)
            if guard is not None:
                guard.remove()
            if isinstance(module, MovingAverageBatchNorm2d):
                module.warmup_iters = warmups[_scope(prefix + name, has_bottom_up)]
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.freeze()
    if s.INIT == "he":
        _he_init(model)
    return model


def _split_retinanet_norms(model, cfg):
    """RetinaNet's head applies one Sequential (conv, norm, ReLU, ...) to every level. Move each of
    our norms into its conv, one instance per level, so no norm is called twice per iteration."""
    for module in model.modules():
        levels = getattr(module, "_num_features", None)
        for seq_name in ("cls_subnet", "bbox_subnet"):
            seq = getattr(module, seq_name, None)
            if levels is None or not isinstance(seq, nn.Sequential):
                continue
            layers = list(seq)
            for i in range(len(layers) - 1):
                conv, norm = layers[i], layers[i + 1]
                if type(conv) is nn.Conv2d and _kind(norm) is not None and not isinstance(norm, PerLevelNorm):
                    per_level = PerLevelNorm([norm] + [build_norm(_kind(norm), norm.num_features, cfg)
                                                       for _ in range(levels - 1)])
                    cls = conv_class_for(norm, cfg.MODEL.SMALLBN.CONV) or NormActConv2d
                    layers[i] = _rebuild_conv(conv, cls, per_level, None, cfg)
                    layers[i + 1] = nn.Identity()
            setattr(module, seq_name, nn.Sequential(*layers))


def _he_init(model):
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and getattr(module, "norm", None) is not None:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, SMALLBN_NORM_TYPES + (nn.GroupNorm, nn.BatchNorm2d)):
            for name, p in module.named_parameters():
                with torch.no_grad():
                    p.fill_(1.0 if "weight" in name else 0.0)


def smallbn_norms(model):
    """All our norm modules in ``model`` (PerLevelNorm members included)."""
    return [m for m in model.modules() if isinstance(m, SMALLBN_NORM_TYPES)]


def check_converted(model):
    """Raises if a norm of ours sits after a conv that was never converted."""
    for name, module in model.named_modules():
        if isinstance(module, SMALLBN_NORM_TYPES) and module.__dict__.get("_unconverted"):
            raise RuntimeError(
                f"{name} ({type(module).__name__}) was created by name but its conv was never converted. "
                "Build models with detectron2.modeling.build_model after `import d2_smallbn`, or call "
                "d2_smallbn.modeling.convert_model(model, cfg).")
