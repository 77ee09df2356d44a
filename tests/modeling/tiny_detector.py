"""Tiny detectors for the integration tests (CPU, seconds): Mask R-CNN R18-FPN configs and dataset
registration. A module of its own, not conftest: every test folder has a ``conftest``, so ``from
conftest import`` would find whichever pytest loaded first, and DDP workers load this by path."""
import os

import d2_smallbn  # noqa: F401  (registration)
from d2_smallbn import add_smallbn_config


def register(name, records):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["red", "green"])


def tiny_cfg(backbone="MABN", fpn="", box="", mask="", dataset="smallbn_tiny", output_dir=None, iters=4,
             meta="GeneralizedRCNN"):
    """Mask R-CNN R18-FPN, 4conv1fc, 32 channels, ~100 px images, 2 images per iteration."""
    import detectron2
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_smallbn_config(cfg)
    name = "COCO-Detection/retinanet_R_50_FPN_1x.yaml" if meta == "RetinaNet" else \
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
    # detectron2's own config files, by path: detectron2.model_zoo imports the deprecated pkg_resources
    cfg.merge_from_file(os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", name))
    m = cfg.MODEL
    m.DEVICE, m.WEIGHTS = "cpu", ""
    m.BACKBONE.NAME = "build_smallbn_retinanet_resnet_fpn_backbone" if meta == "RetinaNet" else \
        "build_smallbn_resnet_fpn_backbone"
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.DEPTH, m.RESNETS.RES2_OUT_CHANNELS, m.RESNETS.NORM = 18, 64, backbone
    m.RESNETS.STRIDE_IN_1X1 = False
    m.FPN.NORM, m.FPN.OUT_CHANNELS = fpn, 32
    m.ROI_BOX_HEAD.NAME, m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC = "FastRCNNConvFCHead", 4, 1
    m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.FC_DIM, m.ROI_BOX_HEAD.NORM = 32, 64, box
    m.ROI_MASK_HEAD.CONV_DIM, m.ROI_MASK_HEAD.NORM = 32, mask
    m.ROI_HEADS.NUM_CLASSES = m.RETINANET.NUM_CLASSES = 2
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE, m.RPN.BATCH_SIZE_PER_IMAGE = 64, 64
    m.RPN.POST_NMS_TOPK_TRAIN, m.RPN.PRE_NMS_TOPK_TRAIN = 64, 200
    m.RPN.POST_NMS_TOPK_TEST, m.RPN.PRE_NMS_TOPK_TEST = 50, 100
    m.RETINANET.NORM = ""
    m.SMALLBN.BCN.NUM_GROUPS = 8
    m.SMALLBN.CBN.WINDOW_SIZE = 3
    m.SMALLBN.MABN.BUFFER_SIZE, m.SMALLBN.MABN.WARMUP_ITERS = 2, 1
    m.SMALLBN.MABN.FPN_WARMUP_ITERS = m.SMALLBN.MABN.HEADS_WARMUP_ITERS = 1
    m.SMALLBN.MABN.CLIP_WARMUP_ITERS = 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 2, 0.01, iters
    cfg.SOLVER.STEPS = (iters - 1,) if iters > 1 else ()
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = min(2, iters - 1), 10 ** 6
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = output_dir or "/tmp/d2_smallbn_test"
    cfg.SEED = 1
    return cfg
