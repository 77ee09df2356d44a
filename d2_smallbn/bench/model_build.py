"""The model benchmark's configs, models and inputs: one detectron2 config and model per setting, the
pseudo-pretrained backbone they all load, the fixed training proposals they all use, and the
synthetic images."""
import types

import torch

from .. import add_smallbn_config  # importing d2_smallbn registers the norms
from .measure import check_steady, priming_steps, shortest_phases
from .model_settings import setting
from ..engine import build_optimizer
from ..layers import NormStateDriver
from ..model_zoo import get_config_file
from ..modeling import check_converted


def build_cfg(key, args):
    """The config of setting ``key``: Mask R-CNN 4conv1fc with its norms, FREEZE_AT 2, every norm's own
    iteration counts at their shortest (``shortest_phases``) and CBN's window from ``--cbn-window``."""
    from detectron2.config import get_cfg

    s = setting(key)
    cfg = get_cfg()
    add_smallbn_config(cfg)
    cfg.merge_from_file(get_config_file("Base-RCNN-FPN-4conv1fc.yaml"))
    m = cfg.MODEL
    m.DEVICE, m.WEIGHTS, m.MASK_ON = args.device, "", True
    m.BACKBONE.FREEZE_AT = 2
    m.RESNETS.DEPTH = args.depth
    m.RESNETS.RES2_OUT_CHANNELS = 64 if args.depth < 50 else 256
    m.RESNETS.NORM = s.backbone
    m.FPN.NORM = m.ROI_BOX_HEAD.NORM = m.ROI_MASK_HEAD.NORM = s.fpn_and_heads
    m.SMALLBN.CONV = s.conv
    for name, phases in shortest_phases().items():
        m.SMALLBN[name].update(phases)
    m.SMALLBN.CBN.WINDOW_SIZE = args.cbn_window
    m.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # a fixed number of detections: the mask head always runs
    if args.tiny:
        m.FPN.OUT_CHANNELS = 32
        m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.FC_DIM, m.ROI_MASK_HEAD.CONV_DIM = 32, 64, 32
        m.ROI_HEADS.NUM_CLASSES = 5
        m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = m.RPN.BATCH_SIZE_PER_IMAGE = 64
        m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 200, 100
        m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 100, 50
        m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
        cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.SOLVER.IMS_PER_BATCH = args.batch
    cfg.SOLVER.BASE_LR = args.lr
    cfg.SEED = args.seed
    cfg.freeze()
    return cfg


@torch.no_grad()
def pseudo_pretrained_backbone(args, inputs):
    """A stand-in for an ImageNet BN checkpoint: the ResNet's random conv weights with BN statistics
    measured on ``inputs`` (one train-mode pass of a BN ResNet, cumulative averages). Loaded into
    every setting, so all of them start from the same backbone weights, and the FrozenBN backbones
    (identity statistics at random init, whose activations would explode through 50 layers and
    diverge in a few steps) are well scaled."""
    from detectron2.modeling import build_model

    cfg = build_cfg("bn", args).clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up
    for m in bottom_up.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    bottom_up.train()
    bottom_up(model.preprocess_image(inputs).tensor)
    return {"backbone.bottom_up." + k: v.detach().clone() for k, v in bottom_up.state_dict().items()}


class MeasuredModel:
    """A setting's model, its optimizer and the per-iteration state the trainer hook would drive."""

    def __init__(self, key, args, backbone_state, proposals_by_sizes):
        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        self.key = key
        self.cfg = build_cfg(key, args)
        torch.manual_seed(args.seed)
        self.model = build_model(self.cfg)
        result = self.model.load_state_dict(backbone_state, strict=False)
        missing = [k for k in result.missing_keys if k.startswith("backbone.bottom_up.")]
        if missing:
            raise RuntimeError(f"{key}: the backbone state did not cover {missing[:5]}")
        check_converted(self.model)
        use_fixed_proposals(self.model, proposals_by_sizes)
        self.model.train()
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.driver = NormStateDriver(self.model, self.optimizer)  # what SmallBNHook drives
        self.counters = self.driver.counters
        self.storage = EventStorage(0)
        self.iteration = 0
        self.folded = None
        self.num_fg = []

    def prime_steps(self):
        """Training steps until every norm runs as in long training (``measure.priming_steps``)."""
        return priming_steps(self.counters)

    def check_steady_state(self):
        check_steady(self.counters, self.iteration, self.key)

    def before_step(self):
        self.driver.before_step(self.iteration)

    def state_bytes(self):
        """Parameters, buffers and optimizer state of this model."""
        total = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total

    def grad_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)


def fixed_proposals(inputs, count, seed, copies_per_box=4, jitter=0.1):
    """Training proposals for ``inputs`` that every setting uses instead of its own RPN's.

    Which proposals a random-init model's RPN ranks highest differs between models, and with it the
    number of foreground RoIs the ROI heads sample and the mask head's work (at small inputs the mask
    head is a large share of a step: 9 more foreground RoIs per image cost more than any norm). With
    the same proposals, and the same RNG state at sampling, every setting's heads get the same RoIs.
    Per image: ``count`` boxes, ``copies_per_box`` jittered copies of each ground-truth box (shifted
    and scaled by up to ``jitter`` of its size, most of them foreground) and uniform random boxes
    overlapping no ground-truth box by IoU 0.5 or more (background). With 4 boxes per image that
    is about 20 foreground RoIs per image, in the range random-init models' own proposals give.
    """
    from detectron2.structures import Boxes, Instances, pairwise_iou

    g = torch.Generator().manual_seed(seed)
    out = []
    for item in inputs:
        gt = item["instances"].gt_boxes.tensor.cpu()
        h, w = item["instances"].image_size
        size = (gt[:, 2:] - gt[:, :2]).repeat(copies_per_box, 1)
        centre = ((gt[:, 2:] + gt[:, :2]) / 2).repeat(copies_per_box, 1)
        centre = centre + (torch.rand(centre.shape, generator=g) * 2 - 1) * jitter * size
        size = size * (1 + (torch.rand(size.shape, generator=g) * 2 - 1) * jitter)
        near = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        rand = torch.zeros(0, 4)
        while len(rand) < count - len(near):
            corners = torch.rand(count, 2, 2, generator=g) * torch.tensor([w, h], dtype=torch.float32)
            more = torch.cat([corners.amin(1), corners.amax(1) + 1.0], dim=1)
            background = pairwise_iou(Boxes(more), Boxes(gt)).amax(1) < 0.5
            rand = torch.cat([rand, more[background]])
        boxes = Boxes(torch.cat([near, rand[:count - len(near)]]))
        boxes.clip((h, w))
        proposals = Instances((h, w))
        proposals.proposal_boxes = boxes.to(item["image"].device)
        proposals.objectness_logits = torch.randn(count, generator=g).to(item["image"].device)
        out.append(proposals)
    return out


def _rpn_forward_with_fixed_proposals(rpn, images, features, gt_instances=None):
    """The RPN's own forward (its losses and its cost), with the benchmark's fixed proposals in training."""
    proposals, losses = type(rpn).forward(rpn, images, features, gt_instances)
    if rpn.training:
        sizes = tuple(tuple(s) for s in images.image_sizes)
        if sizes not in rpn.benchmark_proposals:
            raise KeyError(f"no fixed benchmark proposals for image sizes {sizes}")
        proposals = [p[:] for p in rpn.benchmark_proposals[sizes]]  # fresh Instances, shared tensors
    return proposals, losses


def use_fixed_proposals(model, proposals_by_sizes):
    """Makes ``model``'s RPN return the given proposals in training (eval is unchanged)."""
    rpn = model.proposal_generator
    rpn.benchmark_proposals = proposals_by_sizes
    rpn.forward = types.MethodType(_rpn_forward_with_fixed_proposals, rpn)


def make_inputs(h, w, num_classes, device, seed, count=2, boxes_per_image=4):
    """``count`` images of random pixels with ``boxes_per_image`` painted ellipses (boxes, classes and
    bitmasks as detectron2 Instances)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    train, infer = [], []
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    for _ in range(count):
        image = torch.rand(3, h, w, generator=g) * 255
        n = boxes_per_image
        bw = (0.15 + 0.45 * torch.rand(n, generator=g)) * w
        bh = (0.15 + 0.45 * torch.rand(n, generator=g)) * h
        x0, y0 = torch.rand(n, generator=g) * (w - bw), torch.rand(n, generator=g) * (h - bh)
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
        cx, cy = (x0 + bw / 2).view(n, 1, 1), (y0 + bh / 2).view(n, 1, 1)
        masks = ((xx - cx) / (bw.view(n, 1, 1) / 2)) ** 2 + ((yy - cy) / (bh.view(n, 1, 1) / 2)) ** 2 <= 1
        for i in range(n):
            image[:, masks[i]] = (torch.rand(3, 1, generator=g) * 255)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        inst.gt_masks = BitMasks(masks)
        image = image.to(device)
        train.append({"image": image, "height": h, "width": w, "instances": inst.to(device)})
        infer.append({"image": image, "height": h, "width": w})
    return train, infer
