"""Backbone builders registered in detectron2's BACKBONE_REGISTRY.

They call detectron2's own ResNet-FPN builders (so DEPTH 18-152, STRIDE_IN_1X1, FREEZE_AT and
RES5_DILATION mean what they always mean) with the config's SMALLBN hyper-parameters, then run the
conversion pass on the backbone: normed convs get their matching class, norms of frozen stages are
frozen, and ``MODEL.SMALLBN.INIT: "he"`` gives the from-scratch initialization.
"""
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone

from .norms import building, convert_model


def _build(builder, cfg, input_shape):
    with building(cfg):
        backbone = builder(cfg, input_shape)
    return convert_model(backbone, cfg, prefix="backbone.")


@BACKBONE_REGISTRY.register()
def build_smallbn_resnet_fpn_backbone(cfg, input_shape):
    """ResNet-FPN (Faster/Mask R-CNN) with CBN/MABN/BCN wherever the config names them."""
    return _build(build_resnet_fpn_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_smallbn_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """ResNet-FPN with P6/P7 from P5 (RetinaNet); the head's shared convs get per-level norms."""
    return _build(build_retinanet_resnet_fpn_backbone, cfg, input_shape)
