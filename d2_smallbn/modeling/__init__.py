"""The detectron2 integration: norm names, the conversion pass, backbones, folding."""
from .backbone import build_smallbn_resnet_fpn_backbone, build_smallbn_retinanet_resnet_fpn_backbone
from .fold import fold_model
from .norms import PerLevelNorm, build_norm, building, check_converted, conv_class_for, convert_model, smallbn_norms
from .registration import install

__all__ = [
    "PerLevelNorm", "build_norm", "build_smallbn_resnet_fpn_backbone", "build_smallbn_retinanet_resnet_fpn_backbone",
    "building", "check_converted", "conv_class_for", "convert_model", "fold_model", "install", "smallbn_norms",
]
