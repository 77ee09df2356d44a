"""``convert_batchnorm(module, norm, **layer_kwargs)``: any PyTorch model's ``BatchNorm2d`` layers as
CBN, MABN, BCN or BRN, in the manner of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
Pure PyTorch (no detectron2): it reads the table of norms (``d2_smallbn.norms``).

Each BatchNorm2d becomes the norm's layer, with the BatchNorm's statistics and affine carried over
through the layer's own BN-checkpoint mapping (``map_bn_state``: MABN's E[x^2] = var + mean^2; the
layer's own training state, such as CBN's window, starts fresh). The conv that feeds a BatchNorm gets
the norm's conv class (``conv="auto"``: CBN -> ``CBNConv2d``, which holds the norm, as CBN needs its
conv's input and weight; MABN -> ``CenteredConv2d``; BCN -> ``WSConv2d``; BRN keeps its conv), and the
BatchNorm's place then holds ``nn.Identity``. Which conv feeds which BatchNorm is read from the model's
``torch.fx`` trace: a conv whose output goes only to that BatchNorm, each called once. A conv that
holds its norm as ``conv.norm`` (detectron2's ``Conv2d``) needs no trace.

The helpers ``replace_module``, ``rebuild_conv`` and the "converted" mark are shared with
``d2_smallbn.convert_model`` (detectron2 models), so that a converted model is never converted twice.
"""
import inspect
import logging
import warnings

import torch
from torch import nn

from .norms import NORMS, conv_class_for, conv_kwargs, resolve

logger = logging.getLogger("d2_smallbn.conversion")

CONVERTED = "_smallbn_converted"


SETTINGS = "_smallbn_settings"


def mark_converted(module, settings=None):
    """Records on ``module`` that its norms and convs are built: converting it again changes nothing;
    and ``settings``, the resolved settings they were built with (``d2_smallbn.norms.resolve``), so
    that what trains the model reads the same values (``converted_settings``)."""
    setattr(module, CONVERTED, True)
    if settings is not None:
        setattr(module, SETTINGS, settings)


def converted_settings(module):
    """The resolved settings ``module``'s norms were built with, or None (not converted from settings)."""
    return getattr(module, SETTINGS, None)


def is_converted(module):
    return getattr(module, CONVERTED, False) is True


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


def rebuild_conv(conv, cls, norm, activation, **extra):
    """A ``cls`` conv (one of this project's) with ``conv``'s arguments, weight, bias, device, dtype,
    trainability and mode, holding ``norm`` and ``activation``; ``extra``: the class's own arguments.
    A conv bias before a norm that needs its conv (CBN) is cancelled by the normalization: dropped."""
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  padding_mode=conv.padding_mode, norm=norm, activation=activation,
                  device=conv.weight.device, dtype=conv.weight.dtype, **extra)
    keep_bias = conv.bias is not None and not getattr(norm, "needs_conv_input", False)
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, bias=keep_bias, **kwargs)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if keep_bias:
            new.bias.copy_(conv.bias)
            new.bias.requires_grad_(conv.bias.requires_grad)
    new.train(conv.training)
    return new


# ---- any PyTorch model ----------------------------------------------------------------------------

def convert_batchnorm(module, norm, *, conv="auto", **layer_kwargs):
    """Returns ``module`` with every ``nn.BatchNorm2d`` (subclasses included) replaced by ``norm``
    ("CBN", "MABN", "BCN" or "BRN"), changed in place (a BatchNorm2d passed itself is returned
    converted, as ``SyncBatchNorm.convert_sync_batchnorm`` does).

    ``layer_kwargs``: the layer's arguments (``window_size=4``, ``burnin_iters``, ``warmup_iters``...;
    see ``d2_smallbn.layers``); ``eps`` is the BatchNorm's unless given. ``conv``: "auto" (the norm's
    conv class, the papers'), "plain" (keep the convs: the right choice for MABN or BCN on BN-pretrained
    weights, which centring or WS would change completely), "ws" or "centered". CBN always takes
    ``CBNConv2d``. BatchNorm statistics and affine carry over; a BatchNorm whose affine parameters do
    not train becomes a frozen norm (like FrozenBN). Build the optimizer after converting, and drive
    the layers with ``d2_smallbn.layers.NormStateDriver(model, optimizer).before_step(i)``.
    """
    name = _norm_name(norm)
    spec = NORMS[name]
    conv_cls = conv_class_for(name, conv)
    if isinstance(module, nn.BatchNorm2d):
        if spec.conv_required:
            raise ValueError(f"convert_batchnorm: a lone BatchNorm2d cannot become {name}, which needs the conv "
                             f"that feeds it ({spec.conv.__name__}); convert the model that holds both")
        return _norm_from_bn(spec, module, layer_kwargs)
    batchnorms = {qualname: m for qualname, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    if not batchnorms and is_converted(module):
        logger.info("convert_batchnorm: %s was converted already; nothing to do", type(module).__name__)
        return module
    if not batchnorms:
        warnings.warn(f"convert_batchnorm: {type(module).__name__} has no BatchNorm2d layer; nothing converted",
                      stacklevel=2)
        return module
    feeding = _feeding_convs(module, batchnorms) if conv_cls is not None else {}
    unfed = [qualname for qualname in batchnorms if qualname not in feeding]
    if spec.conv_required and unfed:
        raise ValueError(
            f"convert_batchnorm: {name} needs the conv that feeds it, and these BatchNorm2d layers are not fed "
            f"directly by an nn.Conv2d whose output goes only to them: {', '.join(unfed[:8])}"
            + (", ..." if len(unfed) > 8 else "") + f". Fix: convert the submodules where each BatchNorm2d follows "
            f"its conv (convert_batchnorm(model.layer1, {name!r})), or choose MABN, BCN or BRN")
    if conv_cls is not None and unfed:
        warnings.warn(f"convert_batchnorm: no conv feeds {len(unfed)} BatchNorm2d layer(s) directly "
                      f"({', '.join(unfed[:8])}): they become {name} without the {conv_cls.__name__} of conv="
                      f"{conv!r}", stacklevel=2)
    extra = conv_kwargs(conv_cls, resolve(None)) if conv_cls is not None else {}
    replacements = []  # everything is built before the model changes: a failure leaves it as it was
    for qualname, bn in batchnorms.items():
        layer = _norm_from_bn(spec, bn, layer_kwargs)
        if qualname not in feeding:
            replacements.append((qualname, layer))
            continue
        conv_name, old_conv = feeding[qualname]
        new_conv = rebuild_conv(old_conv, conv_cls, layer, getattr(old_conv, "activation", None), **extra)
        if old_conv.bias is not None and new_conv.bias is None:  # CBN drops the bias: the mean moves with it
            with torch.no_grad():
                layer.running_mean.sub_(old_conv.bias.to(layer.running_mean.dtype))
        replacements.append((conv_name, new_conv))
        if getattr(old_conv, "norm", None) is not bn:  # a separate BatchNorm module after the conv
            replacements.append((qualname, nn.Identity()))
    for qualname, new in replacements:
        _set(module, qualname, new)
    mark_converted(module)
    logger.info("convert_batchnorm: %d BatchNorm2d layer(s) of %s are now %s (%d with their conv as %s)",
                len(batchnorms), type(module).__name__, name, len(feeding),
                conv_cls.__name__ if conv_cls is not None else "-")
    return module


def _norm_name(norm):
    name = norm.upper() if isinstance(norm, str) else norm
    if name not in NORMS:
        raise ValueError(f"convert_batchnorm: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return name


def _norm_from_bn(spec, bn, layer_kwargs):
    """The norm layer for BatchNorm ``bn``: its statistics, affine, device, dtype, mode and freezing."""
    kwargs = {"eps": bn.eps, **layer_kwargs}
    if "affine" in inspect.signature(spec.layer).parameters and "affine" not in layer_kwargs:
        kwargs["affine"] = bn.affine
    layer = spec.layer(bn.num_features, **kwargs)
    reference = next(iter(bn.parameters()), bn.running_mean)
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype)
    state = bn.state_dict()
    if bn.running_var is None:  # track_running_stats=False: only the affine carries over
        state = {k: v for k, v in state.items() if k in ("weight", "bias")}
    unexpected = layer.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"convert_batchnorm: {spec.name} has no place for the BatchNorm2d's {unexpected}")
    layer.train(bn.training)
    if bn.weight is not None and not bn.weight.requires_grad:
        layer.freeze()
    return layer


def _set(root, qualname, new):
    parent_name, _, child = qualname.rpartition(".")
    replace_module(root.get_submodule(parent_name) if parent_name else root, child, new)


def _feeding_convs(module, batchnorms):
    """{BatchNorm qualname: (conv qualname, conv)} for each BatchNorm fed directly by a conv: a conv
    holding it as ``conv.norm``, else a conv whose only use, in the model's fx trace, is that BatchNorm."""
    feeding = {}
    for qualname, m in module.named_modules():
        held = getattr(m, "norm", None) if isinstance(m, nn.Conv2d) else None
        for bn_name, bn in batchnorms.items():
            if held is bn:
                feeding[bn_name] = (qualname, m)
    if len(feeding) == len(batchnorms):
        return feeding
    graph = _trace(module)
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for bn_name in batchnorms:
        nodes = calls.get(bn_name, [])
        if bn_name in feeding or len(nodes) != 1 or not nodes[0].args:
            continue
        source = nodes[0].args[0]
        conv_name = source.target if getattr(source, "op", None) == "call_module" else None
        conv = module.get_submodule(conv_name) if conv_name else None
        if isinstance(conv, nn.Conv2d) and len(calls[conv_name]) == 1 and len(source.users) == 1:
            feeding[bn_name] = (conv_name, conv)
    return feeding


def _trace(module):
    try:
        return torch.fx.Tracer().trace(module)
    except Exception as error:  # noqa: BLE001  (any tracing failure gets the same advice)
        raise ValueError(
            f"convert_batchnorm finds the conv that feeds each BatchNorm2d in the model's torch.fx trace, and "
            f"{type(module).__name__} does not trace ({type(error).__name__}: {error}). Fix: convert the "
            "submodules that trace, or pass conv='plain' (MABN, BCN, BRN keep their convs then)") from error
