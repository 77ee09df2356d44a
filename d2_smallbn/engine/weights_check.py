"""Fine-tuning from ``MODEL.WEIGHTS``: does the checkpoint's backbone fit the config's backbone?

detectron2 loads whatever matches by name and only warns about the rest, so a checkpoint of the
wrong depth, norm or conv type trains silently from a half-initialized or mis-initialized
backbone. Before any tensor is loaded, ``checked_initial_weights`` compares the checkpoint with the
built model and stops the run with ``WeightsMismatchError``, naming each mismatch and what fits:

- depth: the blocks of each backbone stage the model has (basic or bottleneck), for any
  detectron2-format checkpoint (stages the model builds elsewhere, e.g. a C4 head's res5, are
  not compared); the convs' shapes (widths);
- norm type, for files written by ``d2-smallbn-convert-weights``: every backbone norm must find the
  state it needs, as its own layer reads it (``own_state``, ``loads_as_bn`` and ``map_bn_state`` of the
  layers in ``d2_smallbn.norms``: a BN checkpoint's statistics fit CBN, MABN, BRN and BCN; GN's
  affine alone fits only GN). The fix names the ``--target-norm`` that fits and, when the
  checkpoint's own norms do not convert to it, says so;
- WS or centring, when the conversion recorded it (``d2-smallbn-convert-weights --conv``): the
  backbone convs' weight transform (``MODEL.SMALLBN.CONV``'s vocabulary) must be the checkpoint's.

Other files (detectron2's model-zoo .pkl, whose BN statistics are folded into the affine, or a
run's own ``model_final.pth``) get the depth and shape checks only; resuming a run is not checked.
"""
import contextlib
import logging
import re
from collections import Counter
from typing import NamedTuple

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn

from ..layers._common import BN_STATISTICS, NormBase
from ..norms import CONV_TYPES, spec_of
from ..weights import AUTHOR, METADATA_KEY, convertible_targets, layouts, resnet_depth, target_norm_name
from ..weights.hints import TRANSFORM_WORDS, conv_setting

logger = logging.getLogger(__name__)

_CONV_PATH = re.compile(r"(?:^|\.)(stem\.conv1|res[2-5]\.\d+\.(?:conv\d|shortcut))\.(.+)$")
_STOCK_TARGETS = ((FrozenBatchNorm2d, "frozenbn"), (NaiveSyncBatchNorm, "syncbn"), (nn.SyncBatchNorm, "syncbn"),
                  (nn.BatchNorm2d, "bn"), (nn.GroupNorm, "gn"))
_COUNTERS = {"num_batches_tracked"}


class WeightsMismatchError(RuntimeError):
    """MODEL.WEIGHTS does not fit the config's backbone; the message names each mismatch and its fix."""


class Problem(NamedTuple):
    what: str
    detail: str
    fix: str


# ---- the two sides ------------------------------------------------------------------------------

def find_resnet(model):
    """The detectron2 ResNet inside ``model`` (a detector's ``backbone.bottom_up``), or None."""
    for module in model.modules():
        if hasattr(module, "stem") and hasattr(module, "stage_names"):
            return module
    return None


def model_convs(resnet):
    """{"stem.conv1" / "res2.0.conv1" / "res3.0.shortcut" ...: conv module} of a detectron2 ResNet."""
    found = {}
    for name, module in resnet.named_modules():
        if isinstance(module, nn.Conv2d) and _CONV_PATH.fullmatch("." + name + ".weight"):
            found[name] = module
    return found


def checkpoint_convs(state):
    """{conv path: {leaf: value}} of the backbone keys of a checkpoint's "model" dict, whatever the
    prefix (``backbone.bottom_up.``, or none in a converted ImageNet checkpoint)."""
    found = {}
    for key, value in state.items():
        match = _CONV_PATH.search(key)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = value
    return found


def stage_of(path):
    """"res3" of "res3.1.conv2", "stem" of "stem.conv1"."""
    return path.split(".", 1)[0]


def describe(paths):
    """'a ResNet-18 (basic blocks per stage: res2 2, res3 2, res4 2, res5 2)' for a set of conv paths."""
    blocks = Counter()
    for path in paths:
        if path != "stem.conv1":
            stage, block = path.split(".")[:2]
            blocks[stage] = max(blocks[stage], int(block) + 1)
    bottleneck = any(path.endswith(".conv3") for path in paths)
    stages = sorted(blocks)
    depth = resnet_depth([blocks[f"res{i}"] for i in range(2, 6)], bottleneck)
    name = f"a ResNet-{depth}" if depth else "a ResNet"
    per_stage = ", ".join(f"{stage} {blocks[stage]}" for stage in stages)
    return f"{name} ({'bottleneck' if bottleneck else 'basic'} blocks per stage: {per_stage})", depth


def norm_target(norm):
    """The ``--target-norm`` of weight conversion written for a norm module, or None (no norm, unknown)."""
    spec = spec_of(norm)
    if spec is not None:
        return spec.checkpoint_target
    return next((target for cls, target in _STOCK_TARGETS if isinstance(norm, cls)), None)


def norm_label(norm):
    """'FrozenBN (FrozenBatchNorm2d)': the config name and class of a norm module."""
    if norm is None:
        return "no norm"
    target = norm_target(norm)
    return f"{target_norm_name(target)} ({type(norm).__name__})" if target else type(norm).__name__


def weight_transform(conv):
    """'ws', 'centered' or 'plain': what a conv does to its weight (MODEL.SMALLBN.CONV's names)."""
    return next((name for name, cls in CONV_TYPES.items() if cls is not None and isinstance(conv, cls)), "plain")


# ---- the checks ---------------------------------------------------------------------------------

def depth_problems(ckpt, convs):
    """The model's stages must hold the checkpoint's blocks (extra stages of the checkpoint are not
    compared: a model may build them outside its ResNet)."""
    stages = {stage_of(path) for path in convs}
    theirs = {path for path in ckpt if stage_of(path) in stages}
    if theirs == set(convs):
        return []
    their_text, their_depth = describe(ckpt)
    our_text, our_depth = describe(convs)
    if their_depth:
        fix = f"MODEL.RESNETS.DEPTH {their_depth}" + (" (with MODEL.RESNETS.RES2_OUT_CHANNELS 64)" if their_depth < 50
                                                      else "") + f", or weights of a ResNet-{our_depth or '?'}"
    else:
        fix = "weights of the backbone the config builds"
    return [Problem("depth", f"the checkpoint holds {their_text}, the config builds {our_text}", fix)]


def shape_problems(ckpt, convs):
    """The convs' weights must have the model's shapes (widths, groups)."""
    wrong = [(path, tuple(getattr(ckpt[path]["weight"], "shape", ())), tuple(conv.weight.shape))
             for path, conv in convs.items() if "weight" in ckpt.get(path, {})
             and tuple(getattr(ckpt[path]["weight"], "shape", ())) != tuple(conv.weight.shape)]
    if not wrong:
        return []
    path, theirs, ours = wrong[0]
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    return [Problem("width", f"{path}.weight is {theirs} in the checkpoint, {ours} in the model{more}",
                    "the config's widths (MODEL.RESNETS.STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, NUM_GROUPS, "
                    "WIDTH_PER_GROUP) must be the checkpoint's")]


def statistics_keys(norm):
    """The keys of ``norm``'s state that hold statistics a pretrained checkpoint must provide: what a
    BatchNorm's running_mean/running_var become in it (its layer's ``map_bn_state``), if it keeps any."""
    kept = type(norm).statistics_keys() if isinstance(norm, NormBase) else BN_STATISTICS
    return set(kept) & set(norm.state_dict())


def norm_fits(norm, leaves):
    """Whether a checkpoint norm with state keys ``leaves`` loads fully into ``norm`` (None: no norm)."""
    if norm is None:
        return not leaves
    got, expected = set(leaves) - _COUNTERS, set(norm.state_dict()) - _COUNTERS
    from_bn = isinstance(norm, NormBase) and type(norm).loads_as_bn(got)
    unexpected = got - expected - ({"running_mean", "running_var"} if from_bn else set())
    fresh = set(getattr(type(norm), "own_state", ()))
    missing = expected - got - fresh
    has_statistics = from_bn or statistics_keys(norm) <= got
    return bool(got) and not unexpected and not missing and has_statistics


def norm_problems(ckpt, convs, metadata):
    """Every backbone norm must find its state in a converted checkpoint."""
    unfit = [(path, conv.norm, sorted(k[len("norm."):] for k in ckpt.get(path, {}) if k.startswith("norm.")))
             for path, conv in convs.items() if path in ckpt]
    unfit = [(path, norm, leaves) for path, norm, leaves in unfit
             if not norm_fits(norm, leaves)]
    if not unfit:
        return []
    path, norm, leaves = unfit[0]
    more = f" (and {len(unfit) - 1} more norms)" if len(unfit) > 1 else ""
    written = ", ".join(f"{t} x{n}" for t, n in sorted((metadata.get("targets_used") or {}).items()))
    detail = (f"{path}.norm holds {', '.join(leaves) or 'nothing'} in the checkpoint"
              + (f" (converted with --target-norm {written})" if written else "")
              + f", the config's norm there is {norm_label(norm)}{more}")
    return [Problem("norm type", detail, norm_fix(convs, metadata))]


def reference_norm(convs):
    """The norm of the last backbone conv: never frozen below FREEZE_AT 5, so the config's own norm."""
    return convs[sorted(convs, key=_conv_order)[-1]].norm


def _conv_order(path):
    """Stem first, then by stage and block: ("res3.1.conv2") -> (3, 1, "conv2")."""
    if path == "stem.conv1":
        return (1, -1, path)
    stage, block, name = path.split(".")
    return (int(stage[len("res"):]), int(block), name)


def norm_fix(convs, metadata):
    """The conversion target that fits the config's norm, or why the checkpoint's norms cannot."""
    norm = reference_norm(convs)
    target = norm_target(norm) if norm is not None else None
    if target is None:
        return "weights of a backbone without norms, or a config whose backbone has the checkpoint's norms"
    source = metadata.get("source") or "<the pretrained checkpoint>"
    sources = sorted(metadata.get("source_norm_layouts") or {})
    impossible = [layout for layout in sources if layout in layouts()
                  and target not in convertible_targets(layout, metadata.get("num_groups", 32))]
    if impossible:
        layout = impossible[0]
        fits = ", ".join(target_norm_name(t) for t in convertible_targets(layout, metadata.get("num_groups", 32)))
        return (f"the checkpoint's norms were {layout}, which d2-smallbn-convert-weights cannot convert for {target} "
                f"without losing state: fine-tune it with MODEL.RESNETS.NORM one of {fits}, or pretrain the backbone "
                f"with a norm that converts for {target}")
    return f"convert the pretrained checkpoint for this norm: d2-smallbn-convert-weights {source} OUT.pkl " \
           f"--target-norm {target}"


def conv_problems(convs, metadata):
    """The backbone convs must do to their weights what the checkpoint's convs did in training."""
    theirs = metadata.get("weight_transform", "unknown")
    if theirs == "unknown":
        return []
    ours = Counter(weight_transform(conv) for conv in convs.values())
    if set(ours) == {theirs}:
        return []
    found = ", ".join(f"{TRANSFORM_WORDS[t]} x{n}" for t, n in sorted(ours.items()))
    norm = reference_norm(convs)
    name = target_norm_name(norm_target(norm)) if norm is not None and norm_target(norm) else None
    setting = conv_setting(name, theirs) if name else None
    if setting:
        fix = f"MODEL.SMALLBN.CONV {setting}"
    elif name and theirs in ("ws", "centered"):
        fix = f"{name} cannot have {TRANSFORM_WORDS[theirs]}: fine-tune it from a backbone pretrained with plain convs"
    else:
        fix = f"MODEL.SMALLBN.CONV {theirs}, or weights pretrained with the config's convs"
    return [Problem("weight transform", f"the checkpoint's convs were trained with {TRANSFORM_WORDS[theirs]} "
                    f"({theirs}), the config's backbone convs have {found}", fix)]


def backbone_problems(model, checkpoint):
    """[Problem] of a checkpoint (as DetectionCheckpointer reads it) against ``model``'s backbone; []
    when it fits or holds no backbone to compare."""
    resnet = find_resnet(model)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if resnet is None or not isinstance(state, dict):
        return []
    ckpt, convs = checkpoint_convs(state), model_convs(resnet)
    if not ckpt or not convs:
        return []
    problems = depth_problems(ckpt, convs)
    if problems:
        return problems  # block by block comparisons would only repeat it
    problems = shape_problems(ckpt, convs)
    if checkpoint.get("__author__") == AUTHOR:
        metadata = checkpoint.get(METADATA_KEY) or {}
        problems += norm_problems(ckpt, convs, metadata) + conv_problems(convs, metadata)
        if metadata.get("weight_transform", "unknown") == "unknown":
            logger.info("MODEL.WEIGHTS does not say whether its convs were trained with weight standardization or "
                        "centring (converted without d2-smallbn-convert-weights --conv): not checked")
    return problems


def check_backbone_weights(model, checkpoint, weights):
    """Raises WeightsMismatchError naming every mismatch of ``checkpoint`` (file ``weights``) and its fix."""
    problems = backbone_problems(model, checkpoint)
    if problems:
        listed = "; ".join(f"({i}) {p.what}: {p.detail}. Fix: {p.fix}" for i, p in enumerate(problems, 1))
        raise WeightsMismatchError(f"{weights}: MODEL.WEIGHTS does not fit the config's backbone, so nothing was "
                                   f"trained: {listed}")


@contextlib.contextmanager
def checked_initial_weights(checkpointer, weights, resume):
    """Around ``checkpointer.resume_or_load(weights, resume=resume)``: when it loads ``weights`` (not the
    run's own last checkpoint), the file it reads is checked against ``checkpointer.model`` before any
    tensor is loaded (the checkpointer's reader, fvcore's override point, is wrapped meanwhile)."""
    if not weights or (resume and checkpointer.has_checkpoint()):
        yield
        return
    own = "_load_file" in vars(checkpointer)
    read = checkpointer._load_file

    def read_and_check(filename):
        checkpoint = read(filename)
        check_backbone_weights(checkpointer.model, checkpoint, weights)
        return checkpoint

    checkpointer._load_file = read_and_check
    try:
        yield
    finally:
        if own:
            checkpointer._load_file = read
        else:
            del checkpointer._load_file
