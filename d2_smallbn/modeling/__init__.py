"""The detectron2 integration: the conversion call, the patch of two detectron2 functions,
backbone names, folding."""
from .backbone import build_smallbn_resnet_fpn_backbone, build_smallbn_retinanet_resnet_fpn_backbone
from .conversion import PendingNorm, PerLevelNorm, check_converted, convert_model, replace_module, smallbn_norms
from .fold import fold_model
from .patch import install

__all__ = [
    "PendingNorm", "PerLevelNorm", "build_smallbn_resnet_fpn_backbone", "build_smallbn_retinanet_resnet_fpn_backbone",
    "check_converted", "convert_model", "fold_model", "install", "replace_module", "smallbn_norms",
]
