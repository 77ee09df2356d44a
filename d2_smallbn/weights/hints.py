"""What the fine-tuning config needs for converted weights (depth, stride placement, input format,
norm, conv), and notes on convs whose weight transform does not fit the target norm.

Convs cannot say whether they were trained with weight standardization or centring (both happen in
the forward; the raw weights are stored), so ``--conv ws|centered|plain`` states it."""
from ..norms import CONV_TYPES, NORMS, conv_class_for
from .layouts import table_targets, target_norm_name
from .resnet_names import resnet_depth, torchvision_blocks

# What the convs did to their weights in training (--conv): MODEL.SMALLBN.CONV's vocabulary, or unknown.
TRANSFORM_WORDS = {"plain": "plain weights", "ws": "weight standardization", "centered": "weight centralization"}
WEIGHT_TRANSFORMS = ("unknown",) + tuple(k for k in CONV_TYPES if k != "auto")


def config_hints(state, targets_used, num_groups, weight_transform="unknown", model=None):
    """detectron2 config values these weights need (depth, stride placement, input format, norm, conv,
    and what the target norm's ``checkpoint_hints`` reads from the converted state dict ``model``, e.g.
    BCN's groups, ``num_groups`` when it has none): ``state`` is the torchvision state dict."""
    blocks, bottleneck = torchvision_blocks(state)
    hints = {}
    depth = resnet_depth(blocks, bottleneck)
    if depth:
        hints["MODEL.RESNETS.DEPTH"] = depth
    if bottleneck:
        # torchvision strides in the 3x3 conv; detectron2's default (Caffe2 weights) is the 1x1
        hints["MODEL.RESNETS.STRIDE_IN_1X1"] = False
    elif any(blocks):
        hints["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64  # required by detectron2 for R18/R34
    if len(targets_used) == 1:
        target = next(iter(targets_used))
        hints["MODEL.RESNETS.NORM"] = target_norm_name(target)
        spec = table_targets().get(target)
        if spec is not None and spec.checkpoint_hints is not None:
            hints.update(spec.checkpoint_hints(model or {}, num_groups))
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
                     f"with --conv plain to record it); if the checkpoint was trained with "
                     f"{TRANSFORM_WORDS[transform]}, convert with --conv {transform}")
    return notes
