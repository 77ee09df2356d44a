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

Every build path calls it exactly once: the ``build_model`` that ``import d2_smallbn`` installs
(yacs or OmegaConf configs), ``d2_smallbn.model_zoo.get`` and the LazyConfig entry point; a
user's own LazyConfig calls it once after ``instantiate``. A pending norm that reaches a forward
raises an error that names this call.
"""
import math

import torch
from torch import nn

from ..layers import NormActConv2d
from ..norms import NORM_TYPES, NORMS, conv_class_for, conv_kwargs, resolve


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


def _name_of(norm):
    if isinstance(norm, PendingNorm):
        return norm.name
    if isinstance(norm, PerLevelNorm):
        return _name_of(norm.norms[0])
    for name, spec in NORMS.items():
        if type(norm) is spec.layer:
            return name
    return None


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


def _rebuild_conv(conv, cls, norm, activation, s):
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  padding_mode=conv.padding_mode, norm=norm, activation=activation,
                  device=conv.weight.device, dtype=conv.weight.dtype, **conv_kwargs(cls, s))
    # A conv bias before a required conv (CBN) is cancelled by the normalization: dropped (d2 inits it to 0).
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


def convert_model(model, settings=None, *, base_lr=None):
    """Builds the norms a config named and gives every normed conv its conv class. Returns ``model``,
    changed in place.

    ``settings``: a yacs ``CfgNode`` or an OmegaConf ``DictConfig`` (a whole detectron2 config, or a
    LazyConfig root whose ``smallbn`` node holds MODEL.SMALLBN's keys and whose ``optimizer.lr``
    is the base LR), a plain dict of MODEL.SMALLBN values (``{"CBN": {"WINDOW_SIZE": 8}}``), or
    None for the defaults. ``base_lr``: BCN's starting update rate when ``UPDATE_RATE_MODE`` is
    "lr" and the settings carry no learning rate. Wrong types and unknown keys raise ValueError naming
    the key.
    """
    s = resolve(settings, base_lr)
    _refuse_unfit_groups(model, s)
    scope_of = _scopes(model)
    _split_shared_head_norms(model, s, scope_of)
    replaced = set()  # convs swapped for a new one: their old children are not visited again
    for parent_name, parent in list(model.named_modules()):
        if id(parent) in replaced:
            continue
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, PendingNorm):  # a norm outside a conv (a user's own module)
                replace_module(parent, child_name, _build(child, s, scope_of(full)))
            elif isinstance(child, nn.Conv2d) and getattr(child, "norm", None) is not None:
                norm = child.norm
                if isinstance(norm, PendingNorm):
                    norm = _build(norm, s, scope_of(full + ".norm"))
                cls = conv_class_for(_name_of(norm), s.CONV)
                if cls is not None and type(child) is not cls:
                    replace_module(parent, child_name, _rebuild_conv(child, cls, norm, child.activation, s))
                    replaced.add(id(child))
                elif norm is not child.norm:
                    child.norm = norm
    if s.INIT == "he":
        _he_init(model)
    return model


def _refuse_unfit_groups(model, s):
    """BCN groups that do not divide a layer's channels: every such layer and the config key at once,
    before anything is built."""
    groups = s.BCN.NUM_GROUPS
    pending = [(name, m) for name, m in model.named_modules() if isinstance(m, PendingNorm) and m.name == "BCN"]
    unfit = [(name, m) for name, m in pending if m.num_features % groups]
    if not unfit:
        return
    common = math.gcd(*(m.num_features for _, m in pending))
    divisors = [d for d in range(min(common, groups), 0, -1) if common % d == 0][:4]
    listed = ", ".join(f"{name} ({m.num_features} channels)" for name, m in unfit[:6])
    raise ValueError(
        f"MODEL.SMALLBN.BCN.NUM_GROUPS = {groups} does not divide the channels of {len(unfit)} BCN layer(s): {listed}"
        + (", ..." if len(unfit) > 6 else "") + ". Fix: set MODEL.SMALLBN.BCN.NUM_GROUPS to a divisor of every BCN "
        f"layer's channels (here: {', '.join(map(str, divisors))}), or change those layers' channels")


def _split_shared_head_norms(model, s, scope_of):
    """RetinaNet's head applies one Sequential (conv, norm, ReLU, ...) to every level. Each of our
    norms moves into its conv, one instance per level, so no norm is called twice per iteration."""
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
            setattr(module, seq_name, nn.Sequential(*layers))


def _he_init(model):
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and getattr(module, "norm", None) is not None:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, NORM_TYPES + (nn.GroupNorm, nn.BatchNorm2d)):
            for name, p in module.named_parameters():
                with torch.no_grad():
                    p.fill_(1.0 if "weight" in name else 0.0)


def smallbn_norms(model):
    """All of this project's norm modules in ``model`` (PerLevelNorm members included)."""
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def check_converted(model):
    """Raises (naming the fix) if a norm named by a config was never built."""
    for name, module in model.named_modules():
        if isinstance(module, PendingNorm):
            raise RuntimeError(
                f"{name} is a {module.name} norm named in the config that was never converted. Call "
                "`d2_smallbn.convert_model(model, settings)` once after building the model "
                "(detectron2.modeling.build_model does it after `import d2_smallbn`).")
