"""Mask R-CNN R50-FPN with the 4conv1fc box head, as a LazyConfig on top of detectron2's own
``common/models/mask_rcnn_fpn.py`` (model), ``common/data/coco.py`` (COCO 2017, 800 px here),
``common/optim.py`` (SGD) and ``common/train.py``. Each config of this folder names its norms with
``set_norms`` and its schedule with ``multistep``, and sets the ``smallbn`` node (MODEL.SMALLBN's
keys; missing ones take their defaults).

``model`` instantiates to the converted model (``converted``: the conversion with the ``smallbn``
node and ``optimizer.lr``), so detectron2's own ``tools/lazyconfig_train_net.py`` and a plain
``instantiate(cfg.model)`` work unchanged; its keys are detectron2's (``model.backbone.norm`` ...).
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from d2_smallbn.engine.trainer import get_optimizer_params
from d2_smallbn.model_zoo import detectron2_config
from d2_smallbn.modeling.conversion import converted

model = converted(detectron2_config("common/models/mask_rcnn_fpn.py").model)  # instantiates converted
dataloader = detectron2_config("common/data/coco.py").dataloader
optimizer = detectron2_config("common/optim.py").SGD
train = detectron2_config("common/train.py").train

# 4conv1fc box head (the three papers' detection setting); the mask head has 4 convs + the deconv
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.mask_head.conv_dims = [256, 256, 256, 256, 256]

# 800 px training images (the papers' single-scale setting)
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]

# our norms' affine parameters count as norm parameters (weight_decay_norm), like BN and GN
optimizer.params._target_ = get_optimizer_params
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4

smallbn = {}


def set_norms(model, backbone, heads, freeze_at=0):
    """``backbone``: the ResNet's norm (stem and stages); ``heads``: the FPN's and both heads' ("" none)."""
    model.backbone.bottom_up.stem.norm = backbone
    model.backbone.bottom_up.stages.norm = backbone
    model.backbone.bottom_up.freeze_at = freeze_at
    model.backbone.norm = heads
    model.roi_heads.box_head.conv_norm = heads
    model.roi_heads.mask_head.conv_norm = heads


def multistep(max_iter, steps, warmup_iters=500, warmup_factor=1 / 3):
    """lr x 1, 0.1, 0.01 with drops at ``steps``, after a linear warmup of ``warmup_iters`` from ``warmup_factor``."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=list(steps), num_updates=max_iter),
        warmup_length=warmup_iters / max_iter, warmup_method="linear", warmup_factor=warmup_factor)
