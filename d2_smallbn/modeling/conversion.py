"""``convert_model(model, settings=None)``: the one conversion call.

detectron2 builds norms by name with ``get_norm(name, channels)`` (a yacs config key such as
``MODEL.RESNETS.NORM: "CBN"`` or a LazyConfig argument ``norm="CBN"``). For the names in
``d2_smallbn.norms.NORMS`` that gives a ``PendingNorm``: the name, the channel count and an
affine pair, so that detectron2's stage freezing marks it like any norm. ``convert_model`` then,
with the settings of whatever config type the user has:

- builds each pending norm from the table (its settings section, per scope: backbone, FPN,
  heads), frozen where detectron2 froze it;
- gives every normed conv the conv class the table names (CBN -> CBNConv2d bound to its norm,
  MABN -> CenteredConv2d, BCN -> WSConv2d; ``MODEL.SMALLBN.CONV`` "ws"/"centered"/"plain" for
  every normed conv, e.g. GN+WS baselines);
- gives RetinaNet's shared head one norm per FPN level;
- with ``INIT: "he"``, re-initializes every normed conv (He, fan_out) and norm (gamma 1, beta 0).

A converted model is marked so: converting it again (a LazyConfig whose ``model`` is already a call of
the conversion, or a model loaded from a checkpoint) changes nothing, INIT included, and says so at
info level. A model with nothing to convert (a plain PyTorch model) gets a warning that points to
``d2_smallbn.convert_batchnorm``, the call for torch's BatchNorm2d layers.

Every build path calls it exactly once: the ``build_model`` that ``import d2_smallbn`` installs
(yacs or OmegaConf configs); this project's LazyConfigs, whose ``model`` node is ``converted(...)``,
so that a plain ``instantiate(cfg.model)`` (detectron2's ``tools/lazyconfig_train_net.py``,
``d2_smallbn.model_zoo.get``, the LazyConfig entry point) gives the converted model; a user's own
LazyConfig calls it once after ``instantiate``. A pending norm that reaches a forward raises an
error that names this call.
"""
import logging
import warnings

import torch
from torch import nn

from ..batchnorm_conversion import is_converted, mark_converted, rebuild_conv, replace_module
from ..layers import NormActConv2d
from ..layers._common import outside_compiled_graphs
from ..norms import NORMS, conv_class_for, conv_kwargs, norm_types, resolve, spec_of

logger = logging.getLogger("d2_smallbn.conversion")


class PendingNorm(nn.Module):
    """A norm named by a config, not built yet: ``convert_model`` replaces it."""

    def __init__(self, name, num_features):
        super().__init__()
        if name not in NORMS:
            raise KeyError(name)
        self.name, self.num_features = name, num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, *args):
        raise RuntimeError(
            f"A {self.name} norm ({self.num_features} channels) was named in the config but the model was never "
            f"converted, so it has no {self.name} layer yet. Call `d2_smallbn.convert_model(model, settings)` once "
            "after building the model (settings: your config, e.g. the LazyConfig, or a dict of MODEL.SMALLBN "
            "values, or None for the defaults). detectron2.modeling.build_model does it for you after "
            "`import d2_smallbn`.")

    def extra_repr(self):
        return f"{self.name!r}, {self.num_features}, not converted"


class PerLevelNorm(nn.Module):
    """One norm instance per FPN level for a conv shared across levels (RetinaNet's head):
    call i uses norm i mod L, so each instance sees one level once per iteration. The call counter
    is Python state, so under torch.compile every call runs outside the compiled graph."""

    def __init__(self, norms):
        super().__init__()
        self.norms = nn.ModuleList(norms)
        self.needs_conv_input = getattr(norms[0], "needs_conv_input", False)
        self._next = 0

    def attach(self, *args):
        for norm in self.norms:
            norm.attach(*args)

    @outside_compiled_graphs("always")
    def forward(self, y, *conv_inputs):
        norm = self.norms[self._next]
        self._next = (self._next + 1) % len(self.norms)
        return norm(y, *conv_inputs)


def _name_of(norm):
    """The table's name of a norm module (a pending one, or the first of a per-level head norm), or None."""
    if isinstance(norm, PendingNorm):
        return norm.name
    if isinstance(norm, PerLevelNorm):
        return _name_of(norm.norms[0])
    spec = spec_of(norm)
    return spec.name if spec else None


def _rebuild_conv(conv, cls, norm, activation, s):
    return rebuild_conv(conv, cls, norm, activation, **conv_kwargs(cls, s))


def _scopes(model):
    """Module name -> "backbone" / "fpn" / "heads", for settings given per scope (MABN warmups)."""
    if hasattr(model, "backbone"):
        has_bottom_up = hasattr(model.backbone, "bottom_up")

        def scope(name):
            if not name.startswith("backbone."):
                return "heads"
            return "backbone" if not has_bottom_up or name.startswith("backbone.bottom_up.") else "fpn"
    elif hasattr(model, "bottom_up"):  # an FPN backbone on its own
        def scope(name):
            return "backbone" if name.startswith("bottom_up.") else "fpn"
    else:  # a bare backbone, or a user's module
        def scope(name):
            return "backbone"
    return scope


def _build(pending, s, scope):
    """The real norm for a PendingNorm; frozen if detectron2 froze the stage it is in."""
    norm = NORMS[pending.name].build(pending.num_features, s, scope)
    norm = norm.to(device=pending.weight.device)
    frozen = not pending.weight.requires_grad
    if frozen:
        norm.freeze()
    norm.train(pending.training)
    return norm


def convert_model(model, settings=None, *, base_lr=None, expect_norms=True):
    """Builds the norms a config named and gives every normed conv its conv class. Returns ``model``,
    changed in place.

    ``settings``: a yacs ``CfgNode`` or an OmegaConf ``DictConfig`` (a whole detectron2 config, or a
    LazyConfig root whose ``smallbn`` node holds MODEL.SMALLBN's keys and whose ``optimizer.lr``
    is the base LR), a plain dict of MODEL.SMALLBN values (``{"CBN": {"WINDOW_SIZE": 8}}``), or
    None for the defaults. ``base_lr``: BCN's starting update rate when ``UPDATE_RATE_MODE`` is
    "lr" and the settings carry no learning rate. Wrong types and unknown keys raise ValueError naming
    the key.

    A model converted before is returned unchanged (INIT is not applied again, nor are this call's
    settings), with a note at info level; so are the submodules of a model that were converted on
    their own. ``expect_norms``: warn when the call changes nothing (``build_model`` passes False: a
    stock detectron2 model has nothing to convert).
    """
    s = resolve(settings, base_lr)
    if is_converted(model):
        _refuse_new_pending_norms(model)
        logger.info("convert_model: %s was converted already (its norms are built, its convs have their "
                    "classes), so it is returned unchanged: neither INIT nor this call's settings are applied "
                    "again", type(model).__name__)
        return model
    _refuse_unfit_channels(model, s)
    scope_of = _scopes(model)
    changes = _split_shared_head_norms(model, s, scope_of)
    done = _inside_converted(model)  # submodules converted on their own: left as they are
    replaced = set()  # convs swapped for a new one: their old children are not visited again
    for parent_name, parent in list(model.named_modules()):
        if id(parent) in replaced or id(parent) in done:
            continue
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, PendingNorm):  # a norm outside a conv (a user's own module)
                replace_module(parent, child_name, _build(child, s, scope_of(full)))
                changes += 1
            elif isinstance(child, nn.Conv2d) and getattr(child, "norm", None) is not None:
                norm = child.norm
                if isinstance(norm, PendingNorm):
                    norm = _build(norm, s, scope_of(full + ".norm"))
                cls = conv_class_for(_name_of(norm), s.CONV)
                if cls is not None and type(child) is not cls:
                    replace_module(parent, child_name, _rebuild_conv(child, cls, norm, child.activation, s))
                    replaced.add(id(child))
                    changes += 1
                elif norm is not child.norm:
                    child.norm = norm
                    changes += 1
    if s.INIT == "he":
        _he_init(model)
    elif changes == 0:
        if expect_norms:
            _warn_nothing_to_convert(model)
        return model
    mark_converted(model, s)
    return model


def converted(model, settings="${smallbn}", base_lr="${optimizer.lr}"):
    """A LazyConfig ``model`` node (a ``LazyCall`` of a detectron2 model, e.g. detectron2's
    ``common/models/mask_rcnn_fpn.py``) that instantiates to the converted model: the one
    conversion becomes part of the config, so ``instantiate(cfg.model)`` is all any tool calls.

    The node keeps its keys (``model.backbone.norm``, ``model.roi_heads...`` as in detectron2's
    configs); its ``_target_`` becomes ``build_converted``, its own target moves to ``architecture``,
    and ``smallbn`` / ``base_lr`` hold the settings: by default interpolations of the config's
    ``smallbn`` node and ``optimizer.lr``, so overrides of either reach the model. Changes ``model``
    in place and returns it."""
    from detectron2.utils.registry import _convert_target_to_string

    target = model._target_
    model.architecture = target if isinstance(target, str) else _convert_target_to_string(target)
    model._target_ = build_converted
    model.smallbn, model.base_lr = settings, base_lr
    return model


def build_converted(architecture, smallbn=None, base_lr=None, **kwargs):
    """``architecture(**kwargs)`` (a callable or its import path) converted once with the settings
    ``smallbn`` (MODEL.SMALLBN's keys) and ``base_lr``: the target of ``converted`` nodes. A model
    without our norms (a GN or SyncBN baseline) is returned as built, without a warning."""
    if isinstance(architecture, str):
        from detectron2.utils.registry import locate

        architecture = locate(architecture)
    return convert_model(architecture(**kwargs), smallbn, base_lr=base_lr, expect_norms=False)


def _inside_converted(model):
    """The ids of the modules inside submodules of ``model`` that were converted on their own."""
    return {id(inner) for m in model.modules() if m is not model and is_converted(m) for inner in m.modules()}


def _refuse_new_pending_norms(model):
    pending = [name for name, m in model.named_modules() if isinstance(m, PendingNorm)]
    if pending:
        raise RuntimeError(
            f"convert_model: {type(model).__name__} was converted already, but norms named by a config were added "
            f"to it since: {', '.join(pending[:6])}{', ...' if len(pending) > 6 else ''}. A second conversion of the "
            "whole model would apply INIT and the settings again to what was converted, so it is refused. Fix: "
            "convert the new module on its own, with its settings, before adding it")


def _warn_nothing_to_convert(model):
    batchnorms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    why = ("its norms are this project's already and its convs have their classes" if smallbn_norms(model) else
           "it holds no norm named by a config (CBN, MABN, BCN or BRN given to detectron2's get_norm: a config's "
           "NORM keys or a LazyConfig's norm= argument), which is what convert_model builds")
    bn_note = ""
    if batchnorms:
        bn_note = (f" Its {len(batchnorms)} torch BatchNorm2d layer(s) (e.g. {batchnorms[0]!r}) stay BatchNorm: to "
                   "turn a PyTorch model's BatchNorm2d layers into CBN, MABN, BCN or BRN, call "
                   "d2_smallbn.convert_batchnorm(model, 'CBN') instead.")
    warnings.warn(f"convert_model({type(model).__name__}): nothing to convert: {why}.{bn_note}", stacklevel=3)


def _refuse_unfit_channels(model, s):
    """Channel counts a norm's settings cannot serve (its ``check_channels``: BCN's groups), every such
    layer at once, before anything is built."""
    channels = {}
    for name, m in model.named_modules():
        if isinstance(m, PendingNorm):
            channels.setdefault(m.name, {})[name] = m.num_features
    for norm, found in channels.items():
        check = NORMS[norm].check_channels
        problem = check(s[norm], found) if check is not None else None
        if problem:
            raise ValueError(problem)


def _split_shared_head_norms(model, s, scope_of):
    """RetinaNet's head applies one Sequential (conv, norm, ReLU, ...) to every level. Each of our
    norms moves into its conv, one instance per level, so no norm is called twice per iteration.
    Returns the number of convs changed."""
    changes = 0
    for name, module in model.named_modules():
        levels = getattr(module, "_num_features", None)
        for seq_name in ("cls_subnet", "bbox_subnet"):
            seq = getattr(module, seq_name, None)
            if levels is None or not isinstance(seq, nn.Sequential):
                continue
            layers = list(seq)
            for i in range(len(layers) - 1):
                conv, pending = layers[i], layers[i + 1]
                if type(conv) is nn.Conv2d and isinstance(pending, PendingNorm):
                    scope = scope_of(f"{name}.{seq_name}")
                    per_level = PerLevelNorm([_build(pending, s, scope) for _ in range(levels)])
                    cls = conv_class_for(pending.name, s.CONV) or NormActConv2d
                    layers[i] = _rebuild_conv(conv, cls, per_level, None, s)
                    layers[i + 1] = nn.Identity()
                    changes += 1
            setattr(module, seq_name, nn.Sequential(*layers))
    return changes


def _he_init(model):
    done = _inside_converted(model)
    for module in model.modules():
        if id(module) in done:
            continue
        if isinstance(module, nn.Conv2d) and getattr(module, "norm", None) is not None:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, norm_types() + (nn.GroupNorm, nn.BatchNorm2d)):
            for name, p in module.named_parameters():
                with torch.no_grad():
                    p.fill_(1.0 if "weight" in name else 0.0)


def smallbn_norms(model):
    """All of this project's norm modules in ``model`` (PerLevelNorm members included)."""
    return [m for m in model.modules() if isinstance(m, norm_types())]


def check_converted(model):
    """Raises (naming the fix) if a norm named by a config was never built."""
    for name, module in model.named_modules():
        if isinstance(module, PendingNorm):
            raise RuntimeError(
                f"{name} is a {module.name} norm named in the config that was never converted. Call "
                "`d2_smallbn.convert_model(model, settings)` once after building the model "
                "(detectron2.modeling.build_model does it after `import d2_smallbn`).")
