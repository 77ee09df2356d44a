"""Model-level speed and memory of d2_smallbn's norms in Mask R-CNN R50-FPN (4conv1fc box head),
against the matching BatchNorm model measured in the same run.

Settings (backbone stem and res2 frozen in all of them, FREEZE_AT 2, for comparability; the CBN
paper's setting (b) and the paper configs use the same):

    frozen_none   FrozenBN backbone, no norm in FPN and heads (detectron2's default model)
    frozen_bn     FrozenBN backbone, BN in FPN, box head convs and mask head convs
    frozen_gn     FrozenBN backbone, GN in FPN and heads
    frozen_cbn    FrozenBN backbone, CBN in FPN and heads (the CBN paper's default setting)
    bn, gn        that norm in backbone, FPN and heads
    gn_ws         GN with weight-standardized convs (MODEL.SMALLBN.CONV "ws") everywhere
    cbn, mabn     CBN / MABN everywhere
    bcn_ws        BCN + WS everywhere

Models: random init (MODEL.WEIGHTS ""), except that every setting loads the same "pseudo-pretrained"
ResNet: random conv weights with BN statistics measured on the benchmark images, standing in for the
papers' ImageNet BN checkpoint (mapped into each norm as a BN checkpoint is: FrozenBN, BN, CBN and BCN
take the statistics, MABN running_sqmean = var + mean^2, GN only the affine). Without it a random
FrozenBN backbone (identity statistics) explodes through 50 layers and training diverges in a few steps.

What is measured, for each setting, on the same synthetic batch (``--batch``, default 2 images; random pixels with a
few random boxes and elliptic masks, detectron2 Instances, created once):

- training step: forward (losses) + backward + SGD step of ``d2_smallbn.engine.build_optimizer``,
  with the same fixed proposals in every setting (``fixed_proposals``: the RPN runs and computes its
  losses as usual, but the ROI heads get the same RoIs in every model; a random-init model's own
  proposals would make the heads' work, mostly the mask head's, differ by model),
  timed from the forward to the end of the step (device synchronized). Before every step each
  CBN / MABN layer gets ``set_iteration(i)`` and each BCN layer the current learning rate, as
  ``SmallBNHook`` does. CBN burn-in is 0 and the MABN warmups are 2 iterations; CBN and MABN
  models are first primed on small images until CBN's window is full and MABN uses its moving
  averages with clipping, so every timed step is in the steady state. Before each step the RNG is
  seeded with the round number, so every setting draws the same random numbers (RoI sampling);
- peak memory of a training step (separate untimed steps): on CUDA, torch.cuda.max_memory_allocated
  during the step minus the memory allocated before it, plus the model's own state (parameters,
  buffers, optimizer state), i.e. the peak if this model were alone on the device; on CPU, the
  bytes of the unique storages autograd saves for backward (saved_tensors_hooks; parameters and
  buffers excluded) plus parameters, their gradients, buffers and optimizer state. The CPU-style
  number is in the JSON on both devices;
- inference: ``model.inference(inputs, do_postprocess=False)`` in eval mode under no_grad (the
  network, NMS and the mask head; resizing boxes and pasting masks into the image is norm-independent
  and left out), with ROI_HEADS.SCORE_THRESH_TEST 0, so every image yields TEST.DETECTIONS_PER_IMAGE
  detections and the mask head always runs on them; unfolded and folded with
  ``d2_smallbn.modeling.fold_model``. Before timing, each folded model is checked against its
  unfolded model on the benchmark inputs: FPN features, box-head outputs on the same proposals
  and mask-head outputs on the same boxes must agree to a relative 1e-3 (TF32 off for the check),
  and at least 90% of the end-to-end detections must match (ties among random-init scores may be
  broken differently).

Settings are interleaved round-robin (rotated order each round), so machine noise hits all of
them alike; every figure is the median over rounds of the per-round ratio to the matching BN
setting of the same round: frozen_* to frozen_bn, the everywhere settings to bn, bcn_ws also to
gn_ws; folded inference also to frozen_none folded (the same plain-conv architecture) and
unfolded (the stock FrozenBN deployment). Absolute times appear only next to the device name.

Usage:
    d2-smallbn-benchmark [--size HxW] [--depth 50] [--batch 2] [--iters N] [--warmup N] [--device cpu|cuda]
        [--out DIR] [--settings frozen_cbn,mabn,...] [--tiny] [--lr LR] [--cbn-window K] [--seed S]
        [--memory-rounds N] [--threads N] [--profile mabn,bn,...] [--verbose]

Targets (``TARGETS``) are judged by device type: the GPU targets on CUDA, the CPU study's on CPU.
Defaults: 800x1216 on CUDA; 320x480 on CPU (full-size R50 steps take tens of seconds there);
10 timed rounds after 2 warmup rounds on CUDA, 5 after 1 on CPU. ``--tiny`` is a smoke-test model
(R18 unless --depth is given, 32-channel FPN and heads, few RoIs; default size 64x96).
Writes DIR/benchmark.json, DIR/benchmark.md (printed too) and DIR/benchmark.png.
"""
import argparse
import gc
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from .. import add_smallbn_config  # importing d2_smallbn registers the norms
from .common import (CpuShare, command_line, contention_line, device_info, environment,
                     fmt_summary, pyplot, ratio_summary, set_threads, summary, sync, target_verdict,
                     write_json)
from ..engine import build_optimizer
from ..layers import NormStateDriver
from ..model_zoo import get_config_file
from ..modeling import check_converted, fold_model

MABN_WARMUP = 2  # MABN.WARMUP_ITERS / FPN_ / HEADS_ / CLIP_WARMUP_ITERS for the benchmark
FOLD_RTOL = 1e-3
FOLD_MIN_MATCH = 0.9

# key: (backbone norm, FPN and heads norm, MODEL.SMALLBN.CONV, reference, label)
SETTINGS = {
    "frozen_none": ("FrozenBN", "", "auto", "frozen_bn", "FrozenBN backbone, no norm in FPN/heads"),
    "frozen_bn": ("FrozenBN", "BN", "auto", "frozen_bn", "FrozenBN backbone, BN in FPN/heads"),
    "frozen_gn": ("FrozenBN", "GN", "auto", "frozen_bn", "FrozenBN backbone, GN in FPN/heads"),
    "frozen_cbn": ("FrozenBN", "CBN", "auto", "frozen_bn", "FrozenBN backbone, CBN in FPN/heads"),
    "bn": ("BN", "BN", "auto", "bn", "BN everywhere"),
    "gn": ("GN", "GN", "auto", "bn", "GN everywhere"),
    "gn_ws": ("GN", "GN", "ws", "bn", "GN+WS everywhere"),
    "cbn": ("CBN", "CBN", "auto", "bn", "CBN everywhere"),
    "mabn": ("MABN", "MABN", "auto", "bn", "MABN everywhere"),
    "bcn_ws": ("BCN", "BCN", "auto", "bn", "BCN+WS everywhere"),
}
FOLD_REF = "frozen_none"
# (name, section, setting, ratio key, {device type: bound}, description with {} for the bound).
# CPU: the CPU study's targets. CUDA: the GPU targets (the authors' code trains 1.23-1.30x slower than
# BN on GPUs; the CBN paper's Table 6 has 15.1 vs 14.1 GB at 4 images per GPU).
TARGETS = (
    ("cbn_fpn_heads_train", "train", "frozen_cbn", "ratio_vs_frozen_bn", {"cpu": 1.10, "cuda": 1.15},
     "CBN in FPN+heads: train step <= {}x FrozenBN backbone + BN in FPN/heads"),
    ("cbn_train", "train", "cbn", "ratio_vs_bn", {"cuda": 1.25}, "CBN everywhere: train step <= {}x BN everywhere"),
    ("mabn_train", "train", "mabn", "ratio_vs_bn", {"cpu": 1.10, "cuda": 1.05},
     "MABN everywhere: train step <= {}x BN everywhere"),
    ("bcn_ws_train", "train", "bcn_ws", "ratio_vs_gn_ws", {"cpu": 1.10, "cuda": 1.05}, "BCN+WS: train step <= {}x GN+WS"),
    ("frozen_cbn_folded_infer", "infer_folded", "frozen_cbn", "ratio_vs_frozen_none_folded", {"cpu": 1.03, "cuda": 1.02},
     "folded CBN (FPN+heads) inference <= {}x FrozenBN model folded"),
    ("cbn_folded_infer", "infer_folded", "cbn", "ratio_vs_frozen_none_folded", {"cpu": 1.03, "cuda": 1.02},
     "folded CBN (everywhere) inference <= {}x FrozenBN model folded"),
    ("mabn_folded_infer", "infer_folded", "mabn", "ratio_vs_frozen_none_folded", {"cpu": 1.03, "cuda": 1.02},
     "folded MABN inference <= {}x FrozenBN model folded"),
    ("cbn_fpn_heads_memory", "memory", "frozen_cbn", "ratio_vs_frozen_bn", {"cpu": 1.05, "cuda": 1.07},
     "CBN in FPN+heads: peak memory <= {}x BN in FPN/heads"),
    ("cbn_memory", "memory", "cbn", "ratio_vs_bn", {"cpu": 1.05, "cuda": 1.07},
     "CBN everywhere: peak memory <= {}x BN everywhere"),
)


def references(key):
    """The settings ``key`` is compared with."""
    refs = [SETTINGS[key][3], FOLD_REF]
    if key == "bcn_ws":
        refs.append("gn_ws")
    return refs


def with_references(keys):
    """``keys`` plus every setting they are compared with, and those settings' references in turn
    (frozen_none, the fold reference, is itself compared with frozen_bn), in canonical order."""
    closed, todo = set(), list(keys)
    while todo:
        key = todo.pop()
        if key not in closed:
            closed.add(key)
            todo.extend(references(key))
    return [k for k in SETTINGS if k in closed]


# ---- configs, models, inputs --------------------------------------------------------------

def build_cfg(key, args):
    from detectron2.config import get_cfg

    backbone, heads, conv, _, _ = SETTINGS[key]
    cfg = get_cfg()
    add_smallbn_config(cfg)
    cfg.merge_from_file(get_config_file("Base-RCNN-FPN-4conv1fc.yaml"))
    m = cfg.MODEL
    m.DEVICE, m.WEIGHTS, m.MASK_ON = args.device, "", True
    m.BACKBONE.FREEZE_AT = 2
    m.RESNETS.DEPTH = args.depth
    m.RESNETS.RES2_OUT_CHANNELS = 64 if args.depth < 50 else 256
    m.RESNETS.NORM = backbone
    m.FPN.NORM = m.ROI_BOX_HEAD.NORM = m.ROI_MASK_HEAD.NORM = heads
    m.SMALLBN.CONV = conv
    m.SMALLBN.CBN.WINDOW_SIZE = args.cbn_window
    m.SMALLBN.CBN.BURNIN_ITERS, m.SMALLBN.CBN.BURNIN_EPOCHS = 0, 0.0
    s = m.SMALLBN.MABN
    s.WARMUP_ITERS = s.FPN_WARMUP_ITERS = s.HEADS_WARMUP_ITERS = s.CLIP_WARMUP_ITERS = MABN_WARMUP
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


class Setting:
    """A setting's model, optimizer and the per-iteration state the trainer hook would drive."""

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
        """Training steps until every norm runs as in long training (each layer's ``priming_steps``:
        CBN's window full, MABN's moving averages and clipping in use)."""
        return max((m.priming_steps() for m in self.counters if hasattr(m, "priming_steps")), default=0)

    def check_steady_state(self):
        for m in self.counters:
            if hasattr(m, "steady") and not m.steady(self.iteration):
                raise AssertionError(f"{self.key}: {type(m).__name__} not yet as in long training after priming "
                                     f"(its window, warmup or burn-in: {m.priming_steps()} steps)")

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


# ---- steps --------------------------------------------------------------------------------

def train_step(s, inputs, round_seed, device, timed=True):
    """One training step of setting ``s``; returns its duration (seconds) and the losses' sum."""
    s.model.train()
    s.before_step()
    torch.manual_seed(round_seed)
    with s.storage:
        s.storage.iter = s.iteration
        sync(device)
        t0 = time.perf_counter()
        losses = sum(s.model(inputs).values())
        losses.backward()
        s.optimizer.step()
        sync(device)
        elapsed = time.perf_counter() - t0
    s.optimizer.zero_grad(set_to_none=True)
    s.iteration += 1
    loss = float(losses.detach())
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"{s.key}: training loss is {loss} at iteration {s.iteration - 1}; lower --lr")
    if timed:
        fg = s.storage.latest().get("roi_head/num_fg_samples")
        if fg is not None:
            s.num_fg.append(float(fg[0]))
    return elapsed


def infer_step(model, inputs, device):
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.inference(inputs, do_postprocess=False)
    sync(device)
    return time.perf_counter() - t0


def memory_step(s, inputs, round_seed, device):
    """An untimed training step measuring the saved-for-backward bytes and the CUDA peak."""
    state = s.state_bytes()
    own = {t.untyped_storage().data_ptr() for t in list(s.model.parameters()) + list(s.model.buffers())}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            storages[(t.device.type, st.data_ptr())] = st.nbytes()
        return t

    s.model.train()
    s.before_step()
    torch.manual_seed(round_seed)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with s.storage:
        s.storage.iter = s.iteration
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = sum(s.model(inputs).values())
        losses.backward()
        s.optimizer.step()
    entry = {"saved_bytes": sum(storages.values()), "state_bytes": state, "grad_bytes": s.grad_bytes()}
    entry["cpu_metric_bytes"] = entry["saved_bytes"] + state + entry["grad_bytes"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        entry["cuda_step_peak_delta_bytes"] = torch.cuda.max_memory_allocated(device) - before
        entry["metric_bytes"] = entry["cuda_step_peak_delta_bytes"] + state
    else:
        entry["metric_bytes"] = entry["cpu_metric_bytes"]
    s.optimizer.zero_grad(set_to_none=True)
    s.iteration += 1
    return entry


# ---- fold check ---------------------------------------------------------------------------

def _close(name, ref, out, report):
    err = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    report[name] = {"max_abs_err": err, "max_abs_ref": scale}
    if out.shape != ref.shape or not err <= FOLD_RTOL * scale + 1e-6:
        raise AssertionError(f"folded model differs from the unfolded one in {name}: max abs err {err:.3g} "
                             f"(max |ref| {scale:.3g}, shapes {tuple(out.shape)} vs {tuple(ref.shape)})")


def _match_fraction(ref, out, image_size):
    """Fraction of the unfolded model's detections that the folded model also makes (same class,
    box within 1e-3 of the image size, score within a relative 1e-3)."""
    if len(ref) == 0:
        return 1.0
    if len(out) == 0:
        return 0.0
    dist = (ref.pred_boxes.tensor[:, None, :] - out.pred_boxes.tensor[None, :, :]).abs().amax(-1)
    same = ((dist <= 1e-3 * max(image_size)) & (ref.pred_classes[:, None] == out.pred_classes[None, :])
            & ((ref.scores[:, None] - out.scores[None, :]).abs() <= 1e-3 * ref.scores.abs().max()))
    return same.any(1).float().mean().item()


@torch.no_grad()
def check_fold(s, inputs, device):
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _check_fold(s.model.eval(), s.folded, inputs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        s.model.train()


def _check_fold(model, folded, inputs):
    report = {}
    images = model.preprocess_image(inputs)
    feats, feats_f = model.backbone(images.tensor), folded.backbone(images.tensor)
    for name in feats:
        _close(f"features.{name}", feats[name], feats_f[name], report)
    # the heads on the same proposals / boxes (the unfolded model's)
    proposals, _ = model.proposal_generator(images, feats, None)
    boxes = [p.proposal_boxes for p in proposals]
    outputs = []
    for m, f in ((model, feats), (folded, feats_f)):
        heads = m.roi_heads
        outputs.append(heads.box_predictor(heads.box_head(heads.box_pooler([f[k] for k in heads.box_in_features],
                                                                            boxes))))
    _close("box_head.class_logits", outputs[0][0], outputs[1][0], report)
    _close("box_head.box_deltas", outputs[0][1], outputs[1][1], report)
    dets = model.inference(inputs, do_postprocess=False)
    masks = torch.cat([m.pred_masks for m in model.inference(inputs, detected_instances=dets, do_postprocess=False)])
    masks_f = torch.cat([m.pred_masks for m in folded.inference(inputs, detected_instances=dets,
                                                                do_postprocess=False)])
    _close("mask_head.masks", masks, masks_f, report)
    # end to end
    dets_f = folded.inference(inputs, do_postprocess=False)
    fractions = [_match_fraction(a, b, a.image_size) for a, b in zip(dets, dets_f)]
    report["detections_matched_fraction"] = min(fractions)
    report["detections_per_image"] = [len(d) for d in dets]
    if min(fractions) < FOLD_MIN_MATCH:
        raise AssertionError(f"folded model's end-to-end detections match only {min(fractions):.0%} of the "
                             "unfolded model's")
    return report


# ---- the benchmark ------------------------------------------------------------------------

def run(args, device, keys):
    h, w = args.size
    num_classes = 5 if args.tiny else 80
    train_inputs, infer_inputs = make_inputs(h, w, num_classes, device, args.seed, args.batch)
    ph, pw = min(h, 128), min(w, 192)
    prime_inputs, _ = make_inputs(ph, pw, num_classes, device, args.seed + 1, args.batch)

    backbone_state = pseudo_pretrained_backbone(args, infer_inputs)
    count = build_cfg(keys[0], args).MODEL.RPN.POST_NMS_TOPK_TRAIN
    proposals = {tuple(tuple(x["image"].shape[-2:]) for x in batch): fixed_proposals(batch, count, args.seed + i)
                 for i, batch in enumerate((train_inputs, prime_inputs))}
    settings = {}
    for key in keys:
        if args.verbose:
            print(f"building {key}", file=sys.stderr, flush=True)
        settings[key] = Setting(key, args, backbone_state, proposals)
        settings[key].model.to(device)
    primed = {}
    for key, s in settings.items():
        steps = s.prime_steps()
        for i in range(steps):
            train_step(s, prime_inputs, 10_000 + i, device, timed=False)
        s.check_steady_state()
        primed[key] = steps

    rounds = args.warmup + args.iters
    train_t = {k: [] for k in keys}
    infer_t = {(k, f): [] for k in keys for f in (False, True)}
    memory = {k: [] for k in keys}
    fold_report = {}
    share = None
    for r in range(rounds + args.memory_rounds):
        timed = args.warmup <= r < rounds
        if r == args.warmup:
            # fold after the warmup rounds: statistics have moved off their initial values
            for key, s in settings.items():
                s.folded = fold_model(s.model)
                s.folded.requires_grad_(False)
                fold_report[key] = check_fold(s, infer_inputs, device)
            share = CpuShare()
        if r == rounds:
            contention = share.result()  # the timing phase only
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            if r >= rounds:
                memory[key].append(memory_step(settings[key], train_inputs, r, device))
                continue
            t = train_step(settings[key], train_inputs, r, device, timed=timed)
            if timed:
                train_t[key].append(t)
        if r >= args.warmup and r < rounds:
            pairs = [(k, f) for k in keys for f in (False, True)]
            pairs = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
            for key, folded in pairs:
                s = settings[key]
                model = s.folded if folded else s.model.eval()
                infer_t[(key, folded)].append(infer_step(model, infer_inputs, device))
                s.model.train()
        if args.verbose:
            print(f"round {r + 1}/{rounds + args.memory_rounds}", file=sys.stderr, flush=True)
    profiles = {key: profile_step(settings[key], train_inputs, rounds + args.memory_rounds, device, args.out)
                for key in args.profile}
    return {"train": train_t, "infer": infer_t, "memory": memory, "fold": fold_report, "primed": primed,
            "contention": contention, "settings": settings, "profiles": profiles}


def profile_step(s, inputs, round_seed, device, out):
    """One more (untimed) training step of ``s`` under torch.profiler; writes its ops sorted by
    self time to DIR/profile_<setting>.txt and returns the path."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        train_step(s, inputs, round_seed, device, timed=False)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=40, max_name_column_width=60)
    path = out / f"profile_{s.key}.txt"
    path.write_text(f"{s.key}: {SETTINGS[s.key][4]}; one training step\n{table}\n")
    return str(path)


def analyse(raw, keys, device_type):
    train_t, infer_t = raw["train"], raw["infer"]
    train, infer, infer_folded, memory = {}, {}, {}, {}
    for key in keys:
        ref = SETTINGS[key][3]
        train[key] = {"median_s": statistics.median(train_t[key]), "times_s": train_t[key],
                      f"ratio_vs_{ref}": ratio_summary(train_t[key], train_t[ref])}
        if key == "bcn_ws":
            train[key]["ratio_vs_gn_ws"] = ratio_summary(train_t[key], train_t["gn_ws"])
        unf, fol = infer_t[(key, False)], infer_t[(key, True)]
        infer[key] = {"median_s": statistics.median(unf), "times_s": unf,
                      f"ratio_vs_{ref}": ratio_summary(unf, infer_t[(ref, False)]),
                      "ratio_vs_frozen_none": ratio_summary(unf, infer_t[(FOLD_REF, False)])}
        infer_folded[key] = {"median_s": statistics.median(fol), "times_s": fol,
                             "ratio_vs_unfolded": ratio_summary(fol, unf),
                             f"ratio_vs_{ref}_folded": ratio_summary(fol, infer_t[(ref, True)]),
                             "ratio_vs_frozen_none_folded": ratio_summary(fol, infer_t[(FOLD_REF, True)]),
                             "ratio_vs_frozen_none_unfolded": ratio_summary(fol, infer_t[(FOLD_REF, False)])}
        if key == "bcn_ws":
            infer_folded[key]["ratio_vs_gn_ws_folded"] = ratio_summary(fol, infer_t[("gn_ws", True)])
        entries = raw["memory"][key]
        memory[key] = {name: statistics.median(e[name] for e in entries) for name in entries[0]}
        memory[key]["steps"] = entries
    for key in keys:
        ref = SETTINGS[key][3]
        memory[key][f"ratio_vs_{ref}"] = memory[key]["metric_bytes"] / memory[ref]["metric_bytes"]
        if key == "bcn_ws":
            memory[key]["ratio_vs_gn_ws"] = memory[key]["metric_bytes"] / memory["gn_ws"]["metric_bytes"]
    results = {"train": train, "infer": infer, "infer_folded": infer_folded, "memory": memory}
    targets = []
    for name, section, key, ratio_key, bounds, desc in TARGETS:
        if device_type not in bounds:
            continue
        bound = bounds[device_type]
        entry = {"name": name, "setting": key, "section": section, "ratio": ratio_key,
                 "description": desc.format(f"{bound:.2f}")}
        if key not in keys:
            entry.update({"bound": bound, "measured": None, "met": None, "conclusive": None})
        elif section == "memory":
            value = results[section][key][ratio_key]
            entry.update({"bound": bound, "measured": value, "met": value <= bound, "conclusive": True})
        else:
            entry.update(target_verdict(results[section][key][ratio_key], bound))
        targets.append(entry)
    work = {k: summary(raw["settings"][k].num_fg) if raw["settings"][k].num_fg else None for k in keys}
    return results, targets, work


# ---- reporting ----------------------------------------------------------------------------

def markdown(report):
    dev, cfg, res = report["device"], report["config"], report["results"]
    keys = cfg["settings"]
    cpu_extra = f", {dev['cpu_count']} cores" if dev["type"] == "cpu" else ""
    mem_desc = ("CUDA max_memory_allocated during one training step minus the memory allocated before it, plus the "
                "model's parameters, buffers and optimizer state" if dev["type"] == "cuda" else
                "bytes of unique storages saved for backward (saved_tensors_hooks, parameters excluded) plus the "
                "model's parameters, gradients, buffers and optimizer state")
    model = (f"Mask R-CNN R{cfg['depth']}-FPN, 4conv1fc box head" + (" (tiny: 32-channel FPN/heads, few RoIs)"
                                                                     if cfg["tiny"] else ""))
    lines = [
        "# benchmark (model level)", "",
        f"{model}, batch {cfg['batch']}, input {cfg['size'][0]}x{cfg['size'][1]}, FREEZE_AT 2 in every setting, "
        f"random init, SGD lr {cfg['lr']}. {cfg['iters']} timed rounds after {cfg['warmup']} warmup rounds, "
        f"settings interleaved round-robin. Device: {dev['name']} ({dev['type']}{cpu_extra}, "
        f"torch {report['torch_version']}, {dev['torch_threads']} threads).", "",
        "Ratios: median over rounds of the per-round ratio [interquartile range], to the reference of the same "
        "round (frozen_* to frozen_bn, the everywhere settings to bn). Train step = forward + backward + SGD "
        "step, steady state (CBN window full, MABN moving averages with clipping). Inference = "
        "`model.inference(do_postprocess=False)`, eval, no_grad, "
        f"{cfg['detections_per_image']} detections per image. Peak memory: {mem_desc} "
        f"(median of {cfg['memory_rounds']} untimed steps). Folded models were checked against the unfolded "
        "ones on the benchmark inputs before timing.", "",
        f"Command: `{report['command']}`",
    ]
    if cfg["added_references"]:
        lines += ["", f"References added to the requested settings: {', '.join(cfg['added_references'])}."]
    line = contention_line(report["contention"], dev)
    if line:
        lines += ["", line]
    lines += ["", "| setting | reference | train step | peak memory | inference | folded inference vs frozen_none "
                  "folded | vs frozen_none unfolded | vs reference folded | fg RoIs/step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        ref = SETTINGS[key][3]
        tr, mem = res["train"][key], res["memory"][key]
        inf, fol = res["infer"][key], res["infer_folded"][key]
        t_cell, m_cell = fmt_summary(tr[f"ratio_vs_{ref}"]), f"{mem[f'ratio_vs_{ref}']:.3f}"
        f_ref = fmt_summary(fol[f"ratio_vs_{ref}_folded"])
        if key == "bcn_ws":
            t_cell += f"; vs gn_ws {fmt_summary(tr['ratio_vs_gn_ws'])}"
            m_cell += f"; vs gn_ws {mem['ratio_vs_gn_ws']:.3f}"
            f_ref += f"; vs gn_ws folded {fmt_summary(fol['ratio_vs_gn_ws_folded'])}"
        work = report["work_fg_rois_per_image"][key]
        fg = f"{work['median']:.0f}" if work else "-"
        i_cell = fmt_summary(inf[f"ratio_vs_{ref}"])
        lines.append(f"| {key}: {SETTINGS[key][4]} | {ref} | {t_cell} | {m_cell} | {i_cell} "
                     f"| {fmt_summary(fol['ratio_vs_frozen_none_folded'])} "
                     f"| {fmt_summary(fol['ratio_vs_frozen_none_unfolded'])} | {f_ref} | {fg} |")
    lines += ["", "| target | measured | met? |", "|---|---|---|"]
    for t in report["targets"]:
        if t["measured"] is None:
            lines.append(f"| {t['description']} | not measured | - |")
            continue
        met = "yes" if t["met"] else "**no**"
        if not t["conclusive"]:
            met += " (IQR straddles the bound)"
        lines.append(f"| {t['description']} | {t['measured']:.3f} | {met} |")
    ms = lambda k, section: res[section][k]["median_s"] * 1e3  # noqa: E731
    parts = [f"{k} train step {ms(k, 'train'):.1f} ms" for k in ("frozen_bn", "bn") if k in keys]
    parts.append(f"frozen_none inference {ms(FOLD_REF, 'infer'):.1f} ms unfolded, "
                 f"{ms(FOLD_REF, 'infer_folded'):.1f} ms folded")
    parts += [f"{k} memory metric {res['memory'][k]['metric_bytes'] / 2**20:.0f} MiB" for k in ("frozen_bn", "bn")
              if k in keys]
    lines += ["", f"Absolute medians on {dev['name']}: " + "; ".join(parts) + "."]
    lines += ["", "fg RoIs/step: median foreground RoIs per image sampled for the heads in the timed steps (the "
                  "mask head's work). Training steps use the same fixed proposals in every setting, so it is the "
                  "same for all."]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Bar chart of the ratios; bars that carry a target are orange, the target a red dashed line."""
    plt = pyplot()
    res, keys = report["results"], report["config"]["settings"]
    targeted = {(t["section"], t["setting"], t["ratio"]) for t in report["targets"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))

    def bars(ax, section, rows, bound, title):
        # rows: (label, setting, ratio key, value or summary)
        vals, lo, hi, colors = [], [], [], []
        for _, key, ratio_key, v in rows:
            s = v if isinstance(v, dict) else {"median": v, "p25": v, "p75": v}
            vals.append(s["median"])
            lo.append(s["median"] - s["p25"])
            hi.append(s["p75"] - s["median"])
            colors.append("tab:orange" if (section, key, ratio_key) in targeted else "tab:blue")
        ax.bar(range(len(rows)), vals, color=colors, yerr=[lo, hi], capsize=3)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(bound, color="red", ls="--", lw=1.2, label=f"target {bound:.2f}x (orange bars)")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r[0] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)

    def main_rows(section):
        rows = []
        for k in keys:
            ref = SETTINGS[k][3]
            rows.append((f"{k}/{ref}", k, f"ratio_vs_{ref}", res[section][k][f"ratio_vs_{ref}"]))
        if "bcn_ws" in keys:
            rows.append(("bcn_ws/gn_ws", "bcn_ws", "ratio_vs_gn_ws", res[section]["bcn_ws"]["ratio_vs_gn_ws"]))
        return rows

    bars(axes[0], "train", main_rows("train"), 1.10, "training step time ratio (median, IQR)")
    bars(axes[1], "memory", main_rows("memory"), 1.05, "peak training memory ratio")
    rows = [(f"{k} folded", k, "ratio_vs_frozen_none_folded", res["infer_folded"][k]["ratio_vs_frozen_none_folded"])
            for k in keys]
    bars(axes[2], "infer_folded", rows, 1.03, "folded inference time ratio vs frozen_none folded")
    axes[0].set_ylabel("ratio to the reference of the same run")
    dev, cfg = report["device"], report["config"]
    fig.suptitle(f"Mask R-CNN R{cfg['depth']}-FPN, batch {cfg['batch']}, {cfg['size'][0]}x{cfg['size'][1]}"
                 f"{' (tiny)' if cfg['tiny'] else ''}, {cfg['iters']} timed rounds on {dev['name']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------

def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; expected HxW, e.g. 800x1216")
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (at least 32x32)")
    return h, w


def parse_settings(text):
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SETTINGS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown settings {bad}; choose from {', '.join(SETTINGS)}")
    return keys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default 800x1216 on CUDA, 320x480 on CPU, 64x96 with --tiny)")
    p.add_argument("--depth", type=int, choices=(18, 34, 50, 101), default=None,
                   help="ResNet depth (default 50; 18 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="images per training step (default 2; the CBN paper's "
                   "Table 6 uses 4)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--memory-rounds", type=int, default=1, help="untimed memory-measuring steps per setting")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("output/benchmark"))
    p.add_argument("--settings", type=parse_settings, default=list(SETTINGS),
                   help=f"comma-separated subset of {','.join(SETTINGS)}; references are added (default: all)")
    p.add_argument("--tiny", action="store_true", help="smoke-test model: R18, 32-channel FPN/heads, few RoIs")
    p.add_argument("--lr", type=float, default=0.0025,
                   help="SGD learning rate (default 0.0025: the papers' 0.02 for 16 images, scaled to 2)")
    p.add_argument("--cbn-window", type=int, default=4, help="CBN window k (default 4, MODEL.SMALLBN's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every available core)")
    p.add_argument("--profile", type=parse_settings, default=[],
                   help="after the timing, one more training step of each of these settings under "
                        "torch.profiler; writes DIR/profile_<setting>.txt (ops by self time)")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = p.parse_args(argv)
    measured = with_references(args.settings)
    unmeasured = [k for k in args.profile if k not in measured]
    if unmeasured:
        p.error(f"--profile {','.join(unmeasured)}: not measured in this run; add them to --settings")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    cuda = args.device == "cuda"
    args.depth = args.depth or (18 if args.tiny else 50)
    args.size = args.size or ((64, 96) if args.tiny else (800, 1216) if cuda else (320, 480))
    args.iters = args.iters if args.iters is not None else (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    if min(args.iters, args.memory_rounds, args.cbn_window, args.batch) < 1 or args.warmup < 0 or args.lr < 0:
        p.error("--iters, --memory-rounds, --cbn-window and --batch must be >= 1, --warmup and --lr >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    keys = with_references(args.settings)
    added = [k for k in keys if k not in args.settings]

    raw = run(args, device, keys)
    results, targets, work = analyse(raw, keys, device.type)
    cfg0 = raw["settings"][keys[0]].cfg
    report = {
        "command": command_line(),
        "argv": sys.argv,
        "device": device_info(device),
        **environment(),
        "config": {"size": list(args.size), "depth": args.depth, "batch": args.batch, "iters": args.iters,
                   "warmup": args.warmup, "memory_rounds": args.memory_rounds, "tiny": args.tiny, "lr": args.lr,
                   "seed": args.seed, "settings": keys, "requested_settings": list(args.settings),
                   "added_references": added, "freeze_at": 2, "cbn_window_size": args.cbn_window,
                   "cbn_burnin_iters": 0, "mabn_warmup_iters": MABN_WARMUP, "mabn_clip_warmup_iters": MABN_WARMUP,
                   "mabn_buffer_size": cfg0.MODEL.SMALLBN.MABN.BUFFER_SIZE,
                   "detections_per_image": cfg0.TEST.DETECTIONS_PER_IMAGE,
                   "roi_batch_per_image": cfg0.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
                   "primed_steps": raw["primed"]},
        "settings_description": {k: {"backbone": SETTINGS[k][0], "fpn_and_heads": SETTINGS[k][1] or "none",
                                     "conv": SETTINGS[k][2], "reference": SETTINGS[k][3], "label": SETTINGS[k][4]}
                                 for k in keys},
        "memory_metric": ("cuda_step_peak_delta_bytes + state_bytes" if device.type == "cuda"
                          else "saved_bytes + state_bytes + grad_bytes (cpu_metric_bytes)"),
        "timing": ("train: forward+backward+SGD step; inference: model.inference(do_postprocess=False), no_grad; "
                   "per-round ratios, median [p25, p75]"),
        "fold_check": raw["fold"],
        "contention": raw["contention"],
        "work_fg_rois_per_image": work,
        "profiles": raw["profiles"],
        "results": results,
        "targets": targets,
    }
    report["runtime_s"] = time.perf_counter() - start
    json_path, md_path, png_path = args.out / "benchmark.json", args.out / "benchmark.md", args.out / "benchmark.png"
    md = markdown(report)
    write_json(json_path, report)
    md_path.write_text(md)
    plot(report, png_path)
    print(md)
    print(f"runtime {report['runtime_s']:.1f} s; wrote {json_path}, {md_path} and {png_path}")
    for path in report["profiles"].values():
        print(f"profile: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
