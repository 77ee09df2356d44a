"""Torchvision-style ResNet checkpoints -> detectron2 weights (a .pkl that DetectionCheckpointer loads).

The command is ``d2-smallbn-convert`` (also ``python -m d2_smallbn.convert``, ``tools/convert_weights.py``).
Names (``module.`` prefixes of DataParallel removed first):

    conv1.weight                     -> stem.conv1.weight
    bn1.*                            -> stem.conv1.norm.*
    layer{i}.{b}.conv{j}.weight      -> res{i+1}.{b}.conv{j}.weight     (bottleneck j=1..3, basic j=1..2)
    layer{i}.{b}.bn{j}.*             -> res{i+1}.{b}.conv{j}.norm.*
    layer{i}.{b}.downsample.0.weight -> res{i+1}.{b}.shortcut.weight
    layer{i}.{b}.downsample.1.*      -> res{i+1}.{b}.shortcut.norm.*
    fc.*                             -> dropped (or linear.* with keep_classifier)

Convs map 1:1: weight standardization (WS) and centring (MABN) happen in the conv's forward, so a
WS or weight-centralized checkpoint stores the raw weights under the usual names. Each norm is
recognized by its keys and written for the target norm:

    BN   weight, bias, running_mean, running_var[, num_batches_tracked]
         -> bn/syncbn: the same; frozenbn: without num_batches_tracked; a norm of the table
            (d2_smallbn.norms: cbn, mabn, bcn, ...): weight, bias and the statistics as its layer's
            ``map_bn_state`` writes them (mabn: running_sqmean = running_var + running_mean^2, i.e.
            E[x^2]; bcn: the batch part, the group affine then starts at 1/0)
    GN   weight, bias only (GN+WS checkpoints)                     -> gn
    BCN  bn.{weight, bias, running_mean, running_var} and the group affine gn.{weight, bias}
         (or weight/bias beside the inner bn, as in the authors' code) of length G, or per channel
         (length C, reduced to G values when constant within each group)
         -> bcn: norm.{weight, bias, running_mean, running_var, group_weight, group_bias}
    MABN weight, bias, running_sqmean (d2_smallbn's own)            -> mabn

num_batches_tracked is kept for bn/syncbn (NORM "BN"/"SyncBN": the FrozenBatchNorm2d that FREEZE_AT
makes from them has that buffer and reports it missing otherwise) and dropped for the others (a
FrozenBatchNorm2d built by NORM "FrozenBN" has no such buffer and would report it unexpected).
What has no exact counterpart in the target is reported as unmapped, key by key, with the reason.

Convs cannot say whether they were trained with weight standardization or centring (both happen in
the forward; the raw weights are stored), so ``--conv ws|centered|plain`` states it. It is written
into the .pkl (``"d2_smallbn"``: the weight transform, the source norm layouts and the targets) with
the matching ``MODEL.SMALLBN.CONV`` hint, and fine-tuning (``d2_smallbn.engine.weights_check``) stops
before training when the config's backbone convs, norms or depth do not fit it; "unknown" (the
default) leaves the convs unchecked.

Loading (detectron2 0.7.2): DetectionCheckpointer reads a .pkl with "model" and "__author__" as is
(any other .pkl is taken for Caffe2 and renamed, '_' -> '.'); matching_heuristics aligns names by
suffix, so the file loads into a bare ResNet or into backbone.bottom_up of a detector; a key whose
shape differs from the model's is skipped with a warning only. Shapes cannot reveal two mistakes,
so the report lists the config the weights need: a bottleneck torchvision ResNet strides in the
3x3 conv (MODEL.RESNETS.STRIDE_IN_1X1: False), and torchvision's input is RGB with ImageNet
mean/std. Also, FrozenBatchNorm2d fills running_mean/running_var it does not find with 0/1 without
reporting them missing, so a GN checkpoint "loads" into a FrozenBN model silently.
"""
import fnmatch
import json
import os
import pickle
import re
from collections import Counter

from .norms import CONV_TYPES, NORMS, conv_class_for
from .paths import check_output_paths

AUTHOR = "d2_smallbn convert_weights"
# Targets: detectron2's own norms, then every norm of the table (d2_smallbn.norms), whose layer says
# how a BN checkpoint maps onto it (``map_bn_state``) and which of its state starts fresh.
STOCK_NORM_NAMES = {"bn": "BN", "frozenbn": "FrozenBN", "syncbn": "SyncBN", "gn": "GN"}  # target -> NORM
STOCK_TARGETS = tuple(STOCK_NORM_NAMES)


def table_targets():
    """{target: NormSpec} of the table's norms as it is now (``register_norm`` adds to it)."""
    return {spec.checkpoint_target: spec for spec in NORMS.values()}


def targets():
    """Every ``--target-norm``: "auto", detectron2's norms, then the table's."""
    return ("auto",) + STOCK_TARGETS + tuple(table_targets())
# detectron2 norms with a num_batches_tracked buffer: torch's BatchNorm2d/SyncBatchNorm, and
# detectron2's FrozenBatchNorm2d made from them by FREEZE_AT (convert_frozen_batchnorm copies the
# buffer); a FrozenBatchNorm2d built directly (NORM "FrozenBN") has none.
BN_COUNTER_TARGETS = ("bn", "syncbn")
# The checkpoint layouts this module reads (classify_norm) -> the target they convert to by default.
NATURAL_TARGET = {"BN": "bn", "GN": "gn", "BCN": "bcn", "MABN": "mabn"}
# What the convs did to their weights in training (--conv): MODEL.SMALLBN.CONV's vocabulary, or unknown.
TRANSFORM_WORDS = {"plain": "plain weights", "ws": "weight standardization", "centered": "weight centralization"}
WEIGHT_TRANSFORMS = ("unknown",) + tuple(k for k in CONV_TYPES if k != "auto")
METADATA_KEY = "d2_smallbn"  # the .pkl's entry describing what was converted (see save_d2_pickle)

_NORM_RE = re.compile(r"^(?P<mod>bn1|layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?:bn(?P<j>\d)|downsample\.1))"
                      r"\.(?P<rest>.+)$")
_CONV_RE = re.compile(r"^(?P<mod>conv1|layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?:conv(?P<j>\d)|downsample\.0))"
                      r"\.(?P<leaf>weight|bias)$")
_FC_RE = re.compile(r"^fc\.(?P<leaf>weight|bias)$")
_STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network")


class ConvertError(Exception):
    """A checkpoint or output that cannot be used; ``str()`` is one line: file, problem, fix."""

    def __init__(self, path, problem, fix):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


# ---- reading ----------------------------------------------------------------------------------

def load_checkpoint(path, trust_pickle=False):
    """The state dict (name -> tensor) of a torch checkpoint file. The file is read with
    ``torch.load(weights_only=True)``; ``trust_pickle`` allows arbitrary pickled objects (only
    for files you trust: unpickling can run code)."""
    if not os.path.isfile(path):
        raise ConvertError(path, "checkpoint not found" if not os.path.exists(path) else "checkpoint is not a file",
                           "check the path")
    import torch  # after the cheap checks: the import takes seconds

    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ConvertError(path, f"checkpoint cannot be unpickled ({_first_line(e)})",
                               "pass a file written by torch.save") from None
        raise ConvertError(path, f"checkpoint holds objects other than tensors and containers ({_first_line(e)})",
                           "re-run with --trust-pickle if you trust the file (unpickling can run code)") from None
    except Exception as e:  # torch raises RuntimeError / EOFError / ValueError for damaged files
        raise ConvertError(path, f"checkpoint cannot be read by torch.load ({type(e).__name__}: {_first_line(e)})",
                           "pass a complete checkpoint written by torch.save (a truncated download?)") from None
    state = find_state_dict(obj)
    if state is None:
        top = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise ConvertError(path, f"no state dict of tensors found (top level: {top})",
                           "pass a checkpoint holding a model's state_dict (directly or under 'state_dict' / "
                           "'model')")
    return state


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def find_state_dict(obj, depth=0):
    """The name -> tensor mapping inside a loaded checkpoint: the object itself, or one found under
    state_dict / model / model_state / net (nested at most 3 deep). None if there is none."""
    import torch

    if not isinstance(obj, dict) or depth > 3:
        return None
    if obj and sum(torch.is_tensor(v) for v in obj.values()) * 2 > len(obj):
        return dict(obj)
    for key in _STATE_DICT_KEYS:
        found = find_state_dict(obj.get(key), depth + 1)
        if found is not None:
            return found
    return None


# ---- conversion -------------------------------------------------------------------------------

def strip_module_prefix(state):
    """Removes DataParallel's leading ``module.`` (repeated) from every key. Returns (state, count)."""
    out, stripped = {}, 0
    for key, value in state.items():
        new = key
        while new.startswith("module."):
            new = new[len("module."):]
        stripped += new != key
        if new in out:
            raise ValueError(f"keys {key!r} and another one both become {new!r} without 'module.'")
        out[new] = value
    return out, stripped


def _d2_module(m):
    """detectron2 module name for a torchvision ResNet conv/norm match."""
    if m.group("mod") in ("conv1", "bn1"):
        return "stem.conv1"
    base = f"res{int(m.group('stage')) + 1}.{m.group('block')}"
    return f"{base}.conv{m.group('j')}" if m.group("j") else f"{base}.shortcut"


def _vector(t):
    """A tensor with at most one dimension longer than 1 as a 1-D tensor ((1, G, 1) -> (G,)), else None."""
    if t.dim() == 1:
        return t
    if sum(s > 1 for s in t.shape) <= 1:
        return t.reshape(-1)
    return None


def classify_norm(sub):
    """The layout of one norm's keys (relative to the norm): "BN", "GN", "BCN", "MABN" or None."""
    if any(k.startswith("bn.") for k in sub):
        return "BCN"
    if "running_sqmean" in sub:
        return "MABN"
    if "running_mean" in sub and "running_var" in sub:
        return "BN"
    if "weight" in sub and set(sub) <= {"weight", "bias"}:
        return "GN"
    return None


class _NormResult:
    def __init__(self):
        self.out = {}          # dst leaf -> (tensor, how, [src leaves])
        self.dropped = []      # (src leaf, reason)
        self.unmapped = []     # (src leaf, reason)
        self.notes = []


def _batch_part(sub, target, res, prefix=""):
    """BN statistics and per-channel affine (``prefix`` "bn." for BCN's inner BN) for a target norm:
    copied for detectron2's BN-like norms, mapped by the layer's ``map_bn_state`` for the table's."""
    for leaf in ("weight", "bias"):
        if prefix + leaf in sub:
            res.out[leaf] = (sub[prefix + leaf], "copy", [prefix + leaf])
    stats = {"running_mean": sub.get(prefix + "running_mean"), "running_var": sub.get(prefix + "running_var")}
    spec = table_targets().get(target)
    how = spec.layer.map_bn_state(stats, "") if spec is not None else None
    for leaf, tensor in stats.items():
        if leaf in ("running_mean", "running_var"):
            res.out[leaf] = (tensor, "copy", [prefix + leaf])
        else:
            res.out[leaf] = (tensor, how, [prefix + "running_var", prefix + "running_mean"])
    known = {prefix + k for k in ("weight", "bias", "running_mean", "running_var")}
    for leaf in sub:
        if leaf == prefix + "num_batches_tracked":
            # Kept for BN/SyncBN: their frozen stages become FrozenBatchNorm2d with this buffer, which,
            # unlike torch's BatchNorm2d, does not fill it in when the checkpoint lacks it.
            if target in BN_COUNTER_TARGETS:
                res.out["num_batches_tracked"] = (sub[leaf], "copy", [leaf])
            else:
                res.dropped.append((leaf, f"num_batches_tracked: a BN counter that a {target.upper()} norm does "
                                          "not have"))
        elif leaf.startswith(prefix) and leaf not in known:
            res.unmapped.append((leaf, "not part of a BatchNorm (no counterpart in the target norm)"))


_PARAMETERS = {}


def _fresh_parameters(target, written):
    """Parameters of the table's ``target`` norm that a conversion did not write (they start at the
    layer's initial values)."""
    spec = table_targets().get(target)
    if spec is None:
        return []
    if target not in _PARAMETERS:
        _PARAMETERS[target] = [n for n, _ in spec.layer(64).named_parameters()]
    return [n for n in _PARAMETERS[target] if n not in written]


def _group_affine(weight, bias, channels, num_groups, res, src_leaves):
    """BCN's group affine (length G, or length C constant within groups) as group_weight/group_bias."""
    import torch

    w, b = _vector(weight), _vector(bias) if bias is not None else None
    if w is None or (bias is not None and b is None) or (b is not None and b.numel() != w.numel()):
        shapes = f"{tuple(weight.shape)}" + (f" and {tuple(bias.shape)}" if bias is not None else "")
        for leaf in src_leaves:
            res.unmapped.append((leaf, f"group affine of shape {shapes} is not a vector of one length"))
        return
    length = w.numel()
    if length == num_groups and channels % length == 0:
        how = "copy (one value per group)"
    elif length == channels:
        if channels % num_groups:
            for leaf in src_leaves:
                res.unmapped.append((leaf, f"per-channel group affine (length {channels}) cannot be reduced to "
                                     f"{num_groups} groups: {num_groups} does not divide {channels} (--num-groups)"))
            return
        per = channels // num_groups
        constant = all(torch.equal(v.view(num_groups, per), v.view(num_groups, per)[:, :1].expand(-1, per))
                       for v in (w, b) if v is not None)
        if not constant:
            for leaf in src_leaves:
                res.unmapped.append((leaf, f"per-channel group affine (length {channels}) varies within groups of "
                                     f"{per} channels; BatchChannelNorm2d has one scale and shift per group "
                                     f"(G={num_groups}), so it cannot be mapped exactly"))
            return
        w, b = w.view(num_groups, per)[:, 0].clone(), (b.view(num_groups, per)[:, 0].clone() if b is not None else None)
        how = f"per-channel (length {channels}), constant within {num_groups} groups: one value per group"
    elif channels % length == 0:
        how = "copy (one value per group)"
        res.notes.append(f"group affine has {length} groups, not --num-groups {num_groups}: the model needs "
                         f"MODEL.SMALLBN.BCN.NUM_GROUPS = {length}")
    else:
        for leaf in src_leaves:
            res.unmapped.append((leaf, f"group affine of length {length} is neither per channel ({channels}) nor "
                                 f"per group (a divisor of {channels})"))
        return
    res.out["group_weight"] = (w, how, [src_leaves[0]])
    if b is not None:
        res.out["group_bias"] = (b, how, [src_leaves[1]])


def convert_norm(sub, kind, target, num_groups):
    """One norm's keys (``sub``: leaf -> tensor) of layout ``kind`` for ``target``. Returns _NormResult."""
    res = _NormResult()

    def unmap_all(reason):
        res.unmapped.extend((leaf, reason) for leaf in sub)
        return res

    if kind is None:
        return unmap_all(f"unrecognized norm layout (keys {', '.join(sorted(sub))})")
    if kind == "BN":
        if target == "gn":
            return unmap_all("a BatchNorm cannot become a GroupNorm (no per-group statistics); use a GN-pretrained "
                             "checkpoint, or --target-norm bn/mabn/bcn")
        _batch_part(sub, target, res)
        fresh = _fresh_parameters(target, res.out)
        if fresh:
            res.notes.append(f"BN into {target.upper()}: {'/'.join(fresh)} are not in the checkpoint and start at "
                             "the layer's initial values")
        return res
    if kind == "GN":
        if target != "gn":
            return unmap_all(f"a GroupNorm (affine only) has no batch statistics for a {target.upper()} target; "
                             "use --target-norm gn")
        for leaf in sub:
            res.out[leaf] = (sub[leaf], "copy", [leaf])
        return res
    if kind == "MABN":
        if target != NATURAL_TARGET["MABN"]:
            return unmap_all(f"an MABN norm (E[x^2] only, no mean) cannot become {target.upper()}")
        for leaf in sub:
            if leaf in ("weight", "bias", "running_sqmean"):
                res.out[leaf] = (sub[leaf], "copy", [leaf])
            elif leaf in ("num_steps", "sqmean_buffer", "psi_buffer"):
                res.dropped.append((leaf, "MABN training state: starts fresh"))
            else:
                res.unmapped.append((leaf, "not part of an MABN norm"))
        return res
    # BCN: inner BN ("bn.") plus the group affine ("gn.weight/bias", or "weight/bias" beside the inner BN)
    if target == "gn":
        return unmap_all("a BCN norm cannot become a GroupNorm (its batch part has no counterpart)")
    if "bn.running_mean" not in sub or "bn.running_var" not in sub:
        return unmap_all("BCN norm without bn.running_mean/bn.running_var")
    _batch_part({k: v for k, v in sub.items() if k.startswith("bn.")}, target, res, prefix="bn.")
    channels = sub["bn.running_mean"].numel()
    if "gn.weight" in sub:
        affine = ["gn.weight"] + (["gn.bias"] if "gn.bias" in sub else [])
    elif "weight" in sub:
        affine = ["weight"] + (["bias"] if "bias" in sub else [])
    else:
        affine = []
    rest = [leaf for leaf in sub if not leaf.startswith("bn.") and leaf not in affine]
    for leaf in rest:
        res.unmapped.append((leaf, "not part of a BCN norm's batch part or group affine"))
    if not affine:
        res.notes.append("BCN norm without a group affine: group_weight/group_bias start at 1/0")
    elif target != NATURAL_TARGET["BCN"]:
        for leaf in affine:
            res.unmapped.append((leaf, f"the group part of BCN has no counterpart in a {target.upper()} norm"))
    else:
        _group_affine(sub[affine[0]], sub[affine[1]] if len(affine) > 1 else None, channels, num_groups, res,
                      affine)
    return res


def convert_state_dict(state, target_norm="auto", num_groups=32, keep_classifier=False, weight_transform="unknown"):
    """Converts a torchvision-style ResNet state dict. Returns a report dict whose "model" entry is the
    detectron2 state dict (name -> tensor); see ``convert_file`` for the other entries.
    ``weight_transform``: what the convs did to their weights in training (WEIGHT_TRANSFORMS)."""
    import torch

    if target_norm not in targets():
        raise ValueError(f"target norm must be one of {targets()}, got {target_norm!r}")
    if weight_transform not in WEIGHT_TRANSFORMS:
        raise ValueError(f"weight transform must be one of {WEIGHT_TRANSFORMS}, got {weight_transform!r}")
    state, stripped = strip_module_prefix(state)
    model, mapping, dropped, unmapped, notes = {}, [], [], [], []
    layouts, targets_used = Counter(), Counter()
    norms = {}  # torchvision norm module -> (d2 norm module, {leaf: tensor})
    written = {}  # d2 norm module -> (target, leaves written)
    for key, value in state.items():
        if not torch.is_tensor(value):
            unmapped.append((key, f"not a tensor ({type(value).__name__})"))
            continue
        m = _CONV_RE.match(key)
        if m:
            dst = f"{_d2_module(m)}.{m.group('leaf')}"
            model[dst] = value
            mapping.append((dst, [key], "copy"))
            continue
        m = _NORM_RE.match(key)
        if m:
            norms.setdefault(m.group("mod"), (_d2_module(m) + ".norm", {}))[1][m.group("rest")] = value
            continue
        m = _FC_RE.match(key)
        if m:
            if keep_classifier:
                model[f"linear.{m.group('leaf')}"] = value
                mapping.append((f"linear.{m.group('leaf')}", [key], "copy"))
            else:
                dropped.append((key, "ImageNet classifier: a detection backbone has none (--keep-classifier "
                                     "writes it as linear.*)"))
            continue
        unmapped.append((key, "not a torchvision ResNet key (conv1, bn1, layer1-4, fc)"))

    for src_mod, (dst_mod, sub) in norms.items():
        kind = classify_norm(sub)
        layouts[kind or "unrecognized"] += 1
        target = NATURAL_TARGET.get(kind, "bn") if target_norm == "auto" else target_norm
        targets_used[target] += 1
        res = convert_norm(sub, kind, target, num_groups)
        written[dst_mod] = (target, set(res.out))
        for leaf, (tensor, how, src_leaves) in res.out.items():
            vec = _vector(tensor) if tensor.dim() > 1 else None  # vectors stored as (1, C, 1, 1) or (1, G, 1)
            if vec is not None:
                how += f" (flattened from {tuple(tensor.shape)})"
                tensor = vec
            model[f"{dst_mod}.{leaf}"] = tensor
            mapping.append((f"{dst_mod}.{leaf}", [f"{src_mod}.{s}" for s in src_leaves], how))
        dropped += [(f"{src_mod}.{leaf}", reason) for leaf, reason in res.dropped]
        unmapped += [(f"{src_mod}.{leaf}", reason) for leaf, reason in res.unmapped]
        notes += [f"{src_mod}: {n}" for n in res.notes]

    expected = set()
    for dst_mod, leaves in written.items():
        spec = table_targets().get(leaves[0])
        if spec is not None:
            expected.update(f"*.norm.{k}" for k in spec.layer.missing_on_load(leaves[1]))
    if any(k.endswith(".norm.running_var") and k[: -len("running_var")] + "num_batches_tracked" not in model
           for k in model) and set(targets_used) & set(BN_COUNTER_TARGETS):
        expected.add("*.norm.num_batches_tracked")  # FrozenBatchNorm2d reports it when absent
    hints = config_hints(state, targets_used, report_groups(model, num_groups), weight_transform)
    notes += conv_notes(targets_used, weight_transform) + transform_notes(targets_used, weight_transform)
    return {
        "model": model,
        "config_hints": hints,
        "weight_transform": weight_transform,
        "module_prefix_stripped": stripped,
        "target_norm": target_norm,
        "targets_used": dict(targets_used),
        "num_groups": num_groups,
        "source_norm_layouts": dict(layouts),
        "mapped": [{"to": dst, "from": src, "how": how} for dst, src, how in mapping],
        "dropped": [{"key": k, "reason": r} for k, r in dropped],
        "unmapped": [{"key": k, "reason": r} for k, r in unmapped],
        "notes": _dedupe_notes(notes),
        "expected_missing_on_load": sorted(expected),
    }


_DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101,
           (3, 8, 36, 3, True): 152}


def resnet_depth(blocks, bottleneck):
    """The ResNet depth of ``blocks`` per stage (res2-res5) of basic or bottleneck blocks, or None."""
    return _DEPTHS.get(tuple(blocks) + (bool(bottleneck),))


def target_norm_name(target):
    """The MODEL.RESNETS.NORM that a conversion target is written for ("frozenbn" -> "FrozenBN")."""
    return STOCK_NORM_NAMES.get(target) or table_targets()[target].name


def report_groups(model, default):
    """The BCN group count of the converted group affines (``default`` if there are none)."""
    sizes = {v.numel() for k, v in model.items() if k.endswith(".norm.group_weight")}
    return sizes.pop() if len(sizes) == 1 else default


def config_hints(state, targets_used, groups, weight_transform="unknown"):
    """detectron2 config values these weights need (depth, stride placement, input format, norm, conv)."""
    blocks = Counter()
    for key in state:
        m = re.match(r"^layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(m.group(2)) + 1)
    bottleneck = any(re.match(r"^layer[1-4]\.\d+\.(conv3|bn3)\.", k) for k in state)
    hints = {}
    depth = _DEPTHS.get(tuple(blocks[i] for i in range(1, 5)) + (bottleneck,))
    if depth:
        hints["MODEL.RESNETS.DEPTH"] = depth
    if bottleneck:
        # torchvision strides in the 3x3 conv; detectron2's default (Caffe2 weights) is the 1x1
        hints["MODEL.RESNETS.STRIDE_IN_1X1"] = False
    elif blocks:
        hints["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64  # required by detectron2 for R18/R34
    if len(targets_used) == 1:
        target = next(iter(targets_used))
        hints["MODEL.RESNETS.NORM"] = target_norm_name(target)
        if target == "bcn":
            hints["MODEL.SMALLBN.BCN.NUM_GROUPS"] = groups
        conv = conv_setting(target_norm_name(target), weight_transform)
        if conv:
            hints["MODEL.SMALLBN.CONV"] = conv
    # torchvision's ImageNet preprocessing (RGB, mean/std in 0-255 units); detectron2's defaults are Caffe2's BGR
    hints["INPUT.FORMAT"] = "RGB"
    hints["MODEL.PIXEL_MEAN"] = [123.675, 116.28, 103.53]
    hints["MODEL.PIXEL_STD"] = [58.395, 57.12, 57.375]
    return hints


def conv_setting(norm_name, weight_transform):
    """MODEL.SMALLBN.CONV that gives norm ``norm_name``'s convs ``weight_transform``: None when its
    "auto" conv already does, or when the transform is unknown or impossible for the norm."""
    if weight_transform == "unknown":
        return None
    try:
        wanted = conv_class_for(norm_name, weight_transform)
    except ValueError:  # the norm needs its own conv class (CBN)
        return None
    return None if wanted is conv_class_for(norm_name, "auto") else weight_transform


def conv_notes(targets_used, weight_transform):
    """Notes for targets whose norm cannot have convs of ``weight_transform`` (CBN's own conv)."""
    notes = []
    for target in targets_used:
        name = target_norm_name(target)
        try:
            conv_class_for(name, "plain" if weight_transform == "unknown" else weight_transform)
        except ValueError:
            notes.append(f"all norms: {name} needs its own conv ({conv_class_for(name).__name__}, plain weights); "
                         f"{weight_transform} weights do not fit it (fine-tuning refuses them)")
    return notes


def transform_notes(targets_used, weight_transform):
    """Notes for targets whose norm's default conv transforms the weights (MABN's centring, BCN's WS)
    when the checkpoint's convs are not known to have trained with that transform: applied to weights
    trained without it, the transform changes the pretrained features completely."""
    notes = []
    for target in targets_used:
        name = target_norm_name(target)
        conv = conv_class_for(name, "auto") if name in NORMS else None
        transform = next((key for key, cls in CONV_TYPES.items() if cls is not None and cls is conv), None)
        if transform is None or weight_transform == transform:
            continue
        known = "these convs were trained without it" if weight_transform == "plain" else \
            "nothing says these convs were trained with it"
        notes.append(f"all norms: {name}'s default conv ({conv.__name__}) applies {TRANSFORM_WORDS[transform]} to the "
                     f"weights, and {known}: on weights trained without it, that changes the pretrained features "
                     f"completely. For plain BN-pretrained weights, train with MODEL.SMALLBN.CONV plain (and convert "
                     f"with --conv plain to record it); if the checkpoint was trained with {TRANSFORM_WORDS[transform]}, "
                     f"convert with --conv {transform}")
    return notes


def _dedupe_notes(notes):
    """Per-norm notes that repeat for every norm are listed once, with the count."""
    by_text = Counter(n.split(": ", 1)[1] for n in notes)
    out, seen = [], set()
    for n in notes:
        text = n.split(": ", 1)[1]
        if by_text[text] > 1:
            if text not in seen:
                seen.add(text)
                out.append(f"{by_text[text]} norms: {text}")
        else:
            out.append(n)
    return out


def is_expected_missing(key, patterns):
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


# ---- writing ----------------------------------------------------------------------------------

def to_numpy(tensor):
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.contiguous().numpy().copy()


def save_d2_pickle(model, path, metadata=None):
    """Writes {"model": {name: ndarray}, "__author__": AUTHOR, "matching_heuristics": True}, plus
    ``metadata`` under METADATA_KEY when given (DetectionCheckpointer ignores other entries).

    DetectionCheckpointer reads a ``.pkl`` with "model" and "__author__" as detectron2 format; an
    author other than "Caffe2" skips the Caffe2 renaming (which would turn '_' into '.', e.g.
    running_sqmean into running.sqmean); matching_heuristics aligns names by suffix, so the keys
    also load into a backbone nested in a detector (backbone.bottom_up.res2...)."""
    data = {"model": {k: to_numpy(v) for k, v in model.items()}, "__author__": AUTHOR, "matching_heuristics": True}
    if metadata is not None:
        data[METADATA_KEY] = metadata
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:
        raise ConvertError(path, f"output cannot be written ({e.strerror or e})",
                           "pass a writable output path") from None


def default_report_path(output):
    return os.path.splitext(output)[0] + ".report.json"


def convert_file(src, output, target_norm="auto", num_groups=32, keep_classifier=False, report_path=None,
                 trust_pickle=False, weight_transform="unknown"):
    """Reads ``src``, converts, writes ``output`` (.pkl) and the JSON report. Returns the report
    (without the tensors). Raises ConvertError for unusable files."""
    if not output.endswith(".pkl"):
        raise ConvertError(output, "output does not end with .pkl",
                           "name it *.pkl: detectron2 picks the loader by extension, and only .pkl is read "
                           "as a name -> array dict")
    report_path = report_path or default_report_path(output)
    check_output_paths([("output", output), ("--report", report_path)], [("input checkpoint", src)],
                       error=ConvertError)
    state = load_checkpoint(src, trust_pickle=trust_pickle)
    try:
        report = convert_state_dict(state, target_norm, num_groups, keep_classifier, weight_transform)
    except ValueError as e:
        raise ConvertError(src, str(e), "pass a single model's state dict") from None
    model = report.pop("model")
    if not model:
        raise ConvertError(src, f"no torchvision ResNet keys found ({len(state)} keys, e.g. "
                           f"{', '.join(list(state)[:3])})",
                           "pass a ResNet checkpoint with conv1/bn1/layer1-4 keys")
    save_d2_pickle(model, output, converted_metadata(src, report))
    report = {"source": os.path.abspath(src), "output": os.path.abspath(output),
              "num_source_keys": len(state), "num_output_keys": len(model), **report}
    report["report"] = os.path.abspath(report_path)
    try:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise ConvertError(report_path, f"report cannot be written ({e.strerror or e})",
                           "pass --report with a writable path") from None
    return report


def converted_metadata(src, report):
    """What the .pkl says about its conversion, for the fine-tuning check: the source file, its
    norm layouts, the targets written and the convs' weight transform."""
    return {"source": os.path.abspath(src), "source_norm_layouts": report["source_norm_layouts"],
            "targets_used": report["targets_used"], "weight_transform": report["weight_transform"],
            "num_groups": report["num_groups"]}


_LAYOUT_SAMPLES = {  # one norm of each layout this module reads (64 channels), to ask convert_norm
    "BN": ("weight", "bias", "running_mean", "running_var"),
    "GN": ("weight", "bias"),
    "MABN": ("weight", "bias", "running_sqmean"),
    "BCN": ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "gn.weight", "gn.bias"),
}


def convertible_targets(layout, num_groups=32):
    """The targets a norm of ``layout`` ("BN", "GN", "BCN", "MABN") converts to with nothing unmapped."""
    import torch

    sample = {leaf: torch.ones(num_groups if leaf.startswith("gn.") else 64) for leaf in _LAYOUT_SAMPLES[layout]}
    return [t for t in targets()[1:] if not convert_norm(sample, layout, t, num_groups).unmapped]


def format_report(report):
    lines = [f"converted {report['source']} -> {report['output']}",
             f"  {report['num_output_keys']} tensors written from {report['num_source_keys']} keys"
             + (f" ('module.' removed from {report['module_prefix_stripped']})" if report["module_prefix_stripped"]
                else ""),
             "  norms found: " + (", ".join(f"{k} x{n}" for k, n in sorted(report["source_norm_layouts"].items()))
                                  or "none")
             + "; written for: " + (", ".join(f"{t} x{n}" for t, n in sorted(report["targets_used"].items()))
                                    or "-")]
    lines.append(f"  convs trained with weight transform: {report['weight_transform']}"
                 + (" (--conv not given: fine-tuning cannot check WS/centring)"
                    if report["weight_transform"] == "unknown" else ""))
    derived = Counter(m["how"] for m in report["mapped"] if m["how"] != "copy")
    for how, n in sorted(derived.items()):
        lines.append(f"  {n} x {how}")
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    hints = report.get("config_hints") or {}
    if hints:
        lines.append("  config for these weights (input settings: if trained with torchvision's preprocessing):")
        lines += [f"    {k}: {json.dumps(v)}" for k, v in hints.items()]
    reasons = Counter(d["reason"] for d in report["dropped"])
    for reason, n in sorted(reasons.items()):
        lines.append(f"  dropped {n} key{'s' if n > 1 else ''}: {reason}")
    if report["expected_missing_on_load"]:
        lines.append("  loading will list as missing (state the layer starts fresh): "
                     + ", ".join(report["expected_missing_on_load"]))
    if report["unmapped"]:
        lines.append(f"UNMAPPED: {len(report['unmapped'])} key(s) could not be mapped:")
        lines += [f"  {u['key']}: {u['reason']}" for u in report["unmapped"]]
    else:
        lines.append("every key was mapped")
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


def main(argv=None):
    """The command line of d2-smallbn-convert. Exit codes: 0 done; 1 unmapped keys with
    --strict (the output is still written); 2 unusable input or output."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="d2-smallbn-convert",
        description="Convert a torchvision-style ResNet checkpoint (BN, GN+WS, BCN+WS, weight-centralized) "
                    "into a detectron2 .pkl for d2_smallbn's norms.")
    parser.add_argument("input", help="torch checkpoint (.pth/.pt/.tar), optionally DataParallel ('module.')")
    parser.add_argument("output", help="detectron2 weights to write (*.pkl), for MODEL.WEIGHTS")
    parser.add_argument("--target-norm", default="auto", choices=targets(),
                        help="MODEL.RESNETS.NORM of the model that will load the weights (auto: BN->bn, GN->gn, "
                             "BCN->bcn); bn/frozenbn/syncbn/cbn keep the BN statistics (num_batches_tracked only for "
                             "bn/syncbn); mabn writes running_sqmean = running_var + running_mean^2")
    parser.add_argument("--num-groups", type=int, default=32,
                        help="BCN groups (MODEL.SMALLBN.BCN.NUM_GROUPS), to reduce a per-channel group affine")
    parser.add_argument("--conv", default="unknown", choices=WEIGHT_TRANSFORMS,
                        help="what the checkpoint's convs did to their weights in training: ws (weight "
                             "standardization, e.g. GN+WS / BCN+WS), centered (weight centralization, MABN), "
                             "plain; recorded in the .pkl so that fine-tuning checks the config's convs "
                             "(MODEL.SMALLBN.CONV); unknown (default): not checked")
    parser.add_argument("--keep-classifier", action="store_true", help="write fc.* as linear.* instead of dropping it")
    parser.add_argument("--report", help="JSON report path (default: OUTPUT with .report.json)")
    parser.add_argument("--strict", action="store_true", help="exit with 1 if any key could not be mapped")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow checkpoints with arbitrary pickled objects (unpickling can run code)")
    args = parser.parse_args(argv)
    if args.num_groups < 1:
        parser.error("--num-groups must be >= 1")
    try:
        report = convert_file(args.input, args.output, args.target_norm, args.num_groups, args.keep_classifier,
                              args.report, args.trust_pickle, args.conv)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.strict and report["unmapped"]:
        print(f"error: {len(report['unmapped'])} key(s) of {args.input} could not be mapped (--strict)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
