"""One norm's checkpoint keys: which layout they are in, and what they become for a target norm.

Layouts: detectron2's own two, then one per norm of the table (``d2_smallbn.norms``) whose layer has
a layout of its own (the layer's ``is_own_layout``; MABN's state, BCN's released checkpoints):

    BN   weight, bias, running_mean, running_var[, num_batches_tracked]
         -> bn/syncbn: the same; frozenbn: without num_batches_tracked; a norm of the table: weight,
            bias and the statistics as its layer's ``map_bn_state`` writes them (mabn: running_sqmean
            = running_var + running_mean^2, i.e. E[x^2]; bcn: the batch part, the group affine then
            starts at 1/0)
    GN   weight, bias only (GN+WS checkpoints)                     -> gn
    <a norm of the table>, in its layer's own layout               -> that norm (``map_own_layout``);
         a BatchNorm part of it (``own_layout_batch_prefix``, BCN's inner "bn.") goes to any target
         that takes BatchNorm statistics, as a BN layout does

num_batches_tracked is kept for bn/syncbn (NORM "BN"/"SyncBN": the FrozenBatchNorm2d that FREEZE_AT
makes from them has that buffer and reports it missing otherwise) and dropped for the others (a
FrozenBatchNorm2d built by NORM "FrozenBN" has no such buffer and would report it unexpected).
What has no exact counterpart in the target is reported as unmapped, key by key, with the reason.
"""
from typing import NamedTuple

import torch

from ..layers._common import BN_STATISTICS, CheckpointMapping, NormBase, example_keys
from ..norms import NORMS


class StockTarget(NamedTuple):
    """A detectron2 norm as a ``--target-norm``."""
    norm: str  # its MODEL.RESNETS.NORM
    batch_statistics: bool  # it takes a BatchNorm's running statistics
    counter: bool  # it keeps num_batches_tracked: torch's BatchNorm2d / SyncBatchNorm, and the
    # FrozenBatchNorm2d that FREEZE_AT makes from them (a FrozenBatchNorm2d built directly has none)
    kind: str  # in reasons: "a GroupNorm"


STOCK_TARGETS = {
    "bn": StockTarget("BN", True, True, "a BatchNorm"),
    "frozenbn": StockTarget("FrozenBN", True, False, "a FrozenBatchNorm"),
    "syncbn": StockTarget("SyncBN", True, True, "a SyncBatchNorm"),
    "gn": StockTarget("GN", False, False, "a GroupNorm"),
}
STOCK_LAYOUTS = {"BN": "bn", "GN": "gn"}  # detectron2's layouts -> the target they convert to by default
_STOCK_EXAMPLES = {"BN": ("weight", "bias") + BN_STATISTICS, "GN": ("weight", "bias")}


def table_targets():
    """{target: NormSpec} of the table's norms as it is now (``register_norm`` adds to it)."""
    return {spec.checkpoint_target: spec for spec in NORMS.values()}


def targets():
    """Every ``--target-norm``: "auto", detectron2's norms, then the table's."""
    return ("auto",) + tuple(STOCK_TARGETS) + tuple(table_targets())


def target_norm_name(target):
    """The MODEL.RESNETS.NORM that a conversion target is written for ("frozenbn" -> "FrozenBN")."""
    return STOCK_TARGETS[target].norm if target in STOCK_TARGETS else table_targets()[target].name


def takes_batch_statistics(target):
    """Whether ``target`` takes a BatchNorm's statistics (every norm of the table does, through its layer)."""
    return STOCK_TARGETS[target].batch_statistics if target in STOCK_TARGETS else True


def _own_layout_norms():
    """{name: layer class} of the table's norms whose layer has a checkpoint layout of its own."""
    return {name: spec.layer for name, spec in NORMS.items()
            if issubclass(spec.layer, NormBase) and spec.layer.own_layout_example(64, 32) is not None}


def layouts():
    """Every layout read: detectron2's BN and GN, then the table's norms that have their own."""
    return tuple(STOCK_LAYOUTS) + tuple(_own_layout_norms())


def layout_of(sub):
    """The layout of one norm's keys (relative to the norm): a table norm's name when they are in its
    layer's own layout (the table's order decides), else "BN", "GN", or None (unrecognized)."""
    for name, layer in _own_layout_norms().items():
        if layer.is_own_layout(sub):
            return name
    if all(key in sub for key in BN_STATISTICS):
        return "BN"
    if "weight" in sub and set(sub) <= {"weight", "bias"}:
        return "GN"
    return None


def default_target(layout):
    """The target a norm of ``layout`` converts to with ``--target-norm auto`` (unrecognized: bn)."""
    if layout in NORMS:
        return NORMS[layout].checkpoint_target
    return STOCK_LAYOUTS.get(layout, "bn")


# ---- one norm -----------------------------------------------------------------------------------

def convert_norm(sub, layout, target, num_groups):
    """One norm's keys (``sub``: leaf -> tensor) of ``layout`` for ``target``. Returns a CheckpointMapping."""
    result = CheckpointMapping()
    if layout is None:
        result.unmap(sub, f"unrecognized norm layout (keys {', '.join(sorted(sub))})")
    elif layout == "BN":
        _read_bn(sub, target, result)
    elif layout == "GN":
        _read_gn(sub, target, result)
    else:
        _read_own_layout(sub, layout, target, num_groups, result)
    return result


def _read_bn(sub, target, result):
    if not takes_batch_statistics(target):
        takers = ", ".join(t for t in targets()[1:] if takes_batch_statistics(t))
        result.unmap(sub, f"a BatchNorm cannot become {STOCK_TARGETS[target].kind} (no per-group statistics); use a "
                          f"GN-pretrained checkpoint, or a --target-norm that takes BatchNorm statistics ({takers})")
        return
    _read_batch_part(sub, target, result)
    fresh = _fresh_parameters(target, result.out)
    if fresh:
        result.notes.append(f"BN into {target.upper()}: {'/'.join(fresh)} are not in the checkpoint and start at "
                            "the layer's initial values")


def _read_gn(sub, target, result):
    if target != STOCK_LAYOUTS["GN"]:
        result.unmap(sub, f"a GroupNorm (affine only) has no batch statistics for a {target.upper()} target; use "
                          "--target-norm gn")
        return
    for leaf, tensor in sub.items():
        result.copy(leaf, tensor)


def _read_own_layout(sub, name, target, num_groups, result):
    """A norm in the own layout of the table's norm ``name``: its BatchNorm part (if any) as a BN
    checkpoint, then the rest as its layer reads it."""
    layer = NORMS[name].layer
    prefix = layer.own_layout_batch_prefix
    if prefix is not None:
        if not takes_batch_statistics(target):
            result.unmap(sub, f"a {name} norm cannot become {STOCK_TARGETS[target].kind} (its batch part has no "
                              "counterpart)")
            return
        if not all(prefix + key in sub for key in BN_STATISTICS):
            result.unmap(sub, f"{name} norm without {prefix}running_mean/{prefix}running_var")
            return
        _read_batch_part({k: v for k, v in sub.items() if k.startswith(prefix)}, target, result, prefix)
    spec = table_targets().get(target)
    into = None if spec is not None and spec.layer is layer else target.upper()
    layer.map_own_layout(sub, result, name, into, num_groups)


def _read_batch_part(sub, target, result, prefix=""):
    """BN statistics and per-channel affine (under ``prefix``) for a target norm: copied for detectron2's
    BN-like norms, mapped by the layer's ``map_bn_state`` for the table's."""
    for leaf in ("weight", "bias"):
        if prefix + leaf in sub:
            result.copy(leaf, sub[prefix + leaf], [prefix + leaf])
    stats = {key: sub.get(prefix + key) for key in BN_STATISTICS}
    spec = table_targets().get(target)
    how = spec.layer.map_bn_state(stats, "") if spec is not None else None
    for leaf, tensor in stats.items():
        if leaf in BN_STATISTICS:
            result.copy(leaf, tensor, [prefix + leaf])
        else:
            result.copy(leaf, tensor, [prefix + "running_var", prefix + "running_mean"], how)
    known = {prefix + key for key in ("weight", "bias") + BN_STATISTICS}
    for leaf in sub:
        if leaf == prefix + "num_batches_tracked":
            # Kept where the target has the counter: their frozen stages become FrozenBatchNorm2d with
            # this buffer, which, unlike torch's BatchNorm2d, does not fill it in when the checkpoint lacks it.
            if keeps_counter(target):
                result.copy("num_batches_tracked", sub[leaf], [leaf])
            else:
                result.dropped.append((leaf, f"num_batches_tracked: a BN counter that a {target.upper()} norm does "
                                             "not have"))
        elif leaf.startswith(prefix) and leaf not in known:
            result.unmap([leaf], "not part of a BatchNorm (no counterpart in the target norm)")


def keeps_counter(target):
    """Whether ``target``'s layers keep a BatchNorm's num_batches_tracked."""
    return target in STOCK_TARGETS and STOCK_TARGETS[target].counter


def _fresh_parameters(target, written):
    """Parameters of the table's ``target`` norm that a conversion did not write (they start at the
    layer's initial values)."""
    spec = table_targets().get(target)
    if spec is None:
        return []
    return [name for name in example_keys(spec.layer)[0] if name not in written]


def convertible_targets(layout, num_groups=32):
    """The targets a norm of ``layout`` (one of ``layouts()``) converts to with nothing unmapped."""
    if layout in _STOCK_EXAMPLES:
        example = {leaf: torch.ones(64) for leaf in _STOCK_EXAMPLES[layout]}
    else:
        example = NORMS[layout].layer.own_layout_example(64, num_groups)
    return [t for t in targets()[1:] if not convert_norm(example, layout, t, num_groups).unmapped]
