"""Backbone names registered in detectron2's BACKBONE_REGISTRY, for the configs of this project.

They are detectron2's own ResNet-FPN builders under this project's names (so DEPTH 18-152,
STRIDE_IN_1X1, FREEZE_AT and RES5_DILATION mean what they always mean). They convert nothing:
norms named in the config stay pending until ``build_model`` runs the one conversion pass over
the whole model (a backbone built on its own needs ``d2_smallbn.convert_model(backbone, cfg)``).
"""
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone


@BACKBONE_REGISTRY.register()
def build_smallbn_resnet_fpn_backbone(cfg, input_shape):
    """ResNet-FPN (Faster/Mask R-CNN): detectron2's ``build_resnet_fpn_backbone``."""
    return build_resnet_fpn_backbone(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_smallbn_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """ResNet-FPN with P6/P7 from P5 (RetinaNet): detectron2's ``build_retinanet_resnet_fpn_backbone``."""
    return build_retinanet_resnet_fpn_backbone(cfg, input_shape)
