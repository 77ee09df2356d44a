"""Every config under configs/ (Base-* files excepted): it loads, it is the paper row it claims to
be, it builds, and its kind of model trains.

- The paper rows are written down here, independently of the YAML files, as ``ROWS`` (from
  ../shared/notes/experiments.md). File names must follow the naming scheme of docs/configs.md,
  so a config without a row here (or a row without a config) fails.
- The unshrunk config is checked against the row and the paper's setting: architecture, norms,
  conv types, frozen stages, schedule, learning rate, batch and the methods' hyper-parameters.
  Its comment header names the paper and table and states the reported AP, the batch and the
  schedule; ``PAPER_RESULTS`` has its entry.
- Every config (quickstart included) is built at tiny size on CPU (R18, 32-channel FPN and heads),
  and the built model is checked: norm classes and conv classes in each place, frozen stages,
  the hyper-parameters the layers received.
- One paper config per distinct (architecture x norm setting) trains with SmallBNTrainer on
  generated images: 2 iterations where CBN/MABN/BCN state must move past burn-in and warmup, 1
  otherwise.
"""
import copy
import functools
import math
import os
import re
from collections import namedtuple

import pytest
import torch
import detectron2.modeling
from detectron2.layers import Conv2d, FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.layers.batch_norm import CycleBatchNormList
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

import d2_smallbn  # noqa: F401  (registration)
from d2_smallbn.engine import SmallBNTrainer
from d2_smallbn.engine.defaults import build_config
from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                               MovingAverageBatchNorm2d, WSConv2d)
from d2_smallbn.layers.brn import BatchRenorm2d
from d2_smallbn.model_zoo import CONFIG_ROOT, list_configs
from d2_smallbn.modeling import PerLevelNorm, check_converted
from d2_smallbn.paper_results import PAPER_RESULTS, paper_result
from generated_images import register_generated

# ------------------------------------------------------------------------------------------------
# The configs on disk

def _yaml_files():
    found = []
    for folder, _, files in os.walk(CONFIG_ROOT):
        for f in files:
            if f.endswith((".yaml", ".yml")) and not f.startswith("Base-"):
                found.append(os.path.relpath(os.path.join(folder, f), CONFIG_ROOT).replace(os.sep, "/"))
    return sorted(found)


ALL_CONFIGS = _yaml_files()
# quickstart/: the main job's configs; pretrained/: the quickstart fine-tuned from a pretrained backbone
PAPER_CONFIGS = [c for c in ALL_CONFIGS if not c.startswith(("quickstart/", "pretrained/"))]

# ------------------------------------------------------------------------------------------------
# The paper rows (experiments.md). backbone: RESNETS.NORM; heads: the norm of the FPN and of every
# head the architecture has ("" = none); conv: MODEL.SMALLBN.CONV; variant: MABN's "scratch" /
# "finetune"; schedule: the paper's name for it.

Row = namedtuple("Row", "paper table arch depth backbone heads conv variant schedule")


def _rows():
    rows = []
    # CBN Table 4 (Faster R50): setting (a) frozen-BN backbone, then setting (b) norm everywhere.
    for heads in ("", "BN", "SyncBN", "GN", "CBN"):
        rows.append(Row("CBN", "4", "faster", 50, "FrozenBN", heads, "auto", "", "1x"))
    for norm in ("BN", "SyncBN", "GN", "CBN"):
        rows.append(Row("CBN", "4", "faster", 50, norm, norm, "auto", "", "1x"))
    # CBN Table 5: frozen-BN backbone, norm in the FPN and heads.
    for arch, depth in (("faster", 101), ("mask", 50), ("mask", 101)):
        for heads in ("GN", "SyncBN", "CBN"):
            rows.append(Row("CBN", "5", arch, depth, "FrozenBN", heads, "auto", "", "1x"))
    # MABN Table 3 (backbone only), 5 (everywhere), 6 (fine-tuned), 7 (RetinaNet), all 2x.
    for norm in ("BN", "BRN", "SyncBN", "MABN"):
        rows.append(Row("MABN", "3", "mask", 50, norm, "", "auto", "scratch", "2x"))
        rows.append(Row("MABN", "5", "mask", 50, norm, norm, "auto", "scratch", "2x"))
    for norm in ("SyncBN", "MABN"):
        rows.append(Row("MABN", "6", "mask", 50, norm, norm, "auto", "finetune", "2x"))
        rows.append(Row("MABN", "7", "retinanet", 50, norm, norm, "auto", "scratch", "2x"))
    # BCN Table 9 (Mask 2x) and 10 (Faster 1x): GN, GN+WS, BCN+WS everywhere.
    for arch, table, schedule in (("mask", "9", "2x"), ("faster", "10", "1x")):
        for depth in (50, 101):
            for norm, conv in (("GN", "plain"), ("GN", "ws"), ("BCN", "auto")):
                rows.append(Row("BCN", table, arch, depth, norm, norm, conv, "", schedule))
    return rows


def row_file_name(row):
    """The naming scheme of docs/configs.md:
    <paper>/<arch>_R<depth>_FPN_<backbone norm>_<FPN/head norm>[_<variant>]_<schedule>.yaml"""
    def token(norm):
        if norm == "":
            return "none"
        if row.paper == "BCN":
            return {("GN", "plain"): "gn", ("GN", "ws"): "gnws", ("BCN", "auto"): "bcnws"}[norm, row.conv]
        return norm.lower()

    arch = {"faster": "faster_rcnn", "mask": "mask_rcnn", "retinanet": "retinanet"}[row.arch]
    variant = f"_{row.variant}" if row.variant else ""
    return (f"{row.paper.lower()}/{arch}_R{row.depth}_FPN_{token(row.backbone)}_{token(row.heads)}"
            f"{variant}_{row.schedule}.yaml")


ROWS = {row_file_name(r): r for r in _rows()}
# Short names at the top level of configs/ for a row's config.
ALIASES = {"mask_rcnn_R50_FPN_cbn.yaml": "cbn/mask_rcnn_R50_FPN_frozenbn_cbn_1x.yaml"}


def row_of(name):
    return ROWS[ALIASES.get(name, name)]


# ------------------------------------------------------------------------------------------------
# The papers' settings (experiments.md)

COCO_TRAIN2017 = 117266  # images left by detectron2's empty-annotation filter
CBN_ITERS_PER_EPOCH = COCO_TRAIN2017 / 16


def expected_solver(row):
    """(images per iteration, images per GPU, base lr, max iter, steps)."""
    if row.paper == "CBN":  # 12 epochs, lr /10 after the 9th and 11th, at 16 images per iteration
        return 16, 4, 0.02, math.ceil(12 * CBN_ITERS_PER_EPOCH), \
            (round(9 * CBN_ITERS_PER_EPOCH), round(11 * CBN_ITERS_PER_EPOCH))
    if row.paper == "MABN":  # 2x at 8 GPUs x 2 images
        return 16, 2, (0.01 if row.arch == "retinanet" else 0.02), 180000, (120000, 160000)
    per_gpu = {50: 2, 101: 1}[row.depth]  # BCN: 4 GPUs
    lr = {50: 0.01, 101: 0.005}[row.depth]
    max_iter, steps = {("faster", 50): (180000, (120000, 160000)), ("faster", 101): (360000, (240000, 320000)),
                       ("mask", 50): (360000, (300000, 340000)), ("mask", 101): (720000, (600000, 680000))}[
        row.arch, row.depth]
    return 4 * per_gpu, per_gpu, lr, max_iter, steps


def expected_freeze_at(row):
    return 0 if row.variant == "scratch" else 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def load(name):
    """The config as training would see it (d2_smallbn's build_config); tests clone before changing it."""
    return build_config(name)


@pytest.fixture(scope="module")
def configs():
    return load


# ------------------------------------------------------------------------------------------------
# Inventory

def test_every_config_is_enumerated_and_named_by_the_scheme():
    assert ALL_CONFIGS == list_configs()  # the model zoo lists exactly the files on disk
    assert "mask_rcnn_R50_FPN_cbn.yaml" in ALL_CONFIGS  # the CBN paper's default Mask R-CNN setting
    unknown = sorted(set(PAPER_CONFIGS) - set(ROWS) - set(ALIASES))
    assert not unknown, f"configs without a row in ROWS (add the paper row to this test): {unknown}"
    missing = sorted(set(ROWS) - set(PAPER_CONFIGS))
    assert not missing, f"paper rows without a config: {missing}"
    for alias, target in ALIASES.items():
        assert alias in ALL_CONFIGS and target in ALL_CONFIGS


def test_every_paper_config_has_its_paper_result():
    assert set(PAPER_RESULTS) == set(PAPER_CONFIGS)
    for name in PAPER_CONFIGS:
        row, result = row_of(name), paper_result("configs/" + name)
        assert result is PAPER_RESULTS[name]
        assert (result["paper"], result["table"]) == (row.paper, row.table), name
        assert result["bbox"] and set(result["bbox"]) <= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert ("segm" in result) == (row.arch == "mask"), name
        if "segm" in result:
            assert set(result["segm"]) <= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and "AP" in result["segm"]
        # only the BCN R101 Faster rows, garbled in the extracted text, lack the AP
        garbled = (row.paper, row.arch, row.depth) == ("BCN", "faster", 101)
        assert ("AP" in result["bbox"]) != garbled, name
    for alias, target in ALIASES.items():
        assert PAPER_RESULTS[alias] == PAPER_RESULTS[target]
    # spot checks against experiments.md, one per table
    assert PAPER_RESULTS["cbn/faster_rcnn_R50_FPN_frozenbn_cbn_1x.yaml"]["bbox"] == \
        {"AP": 37.7, "AP50": 59.0, "AP75": 40.7, "APs": 22.1, "APm": 40.9, "APl": 48.8}
    assert PAPER_RESULTS["cbn/mask_rcnn_R101_FPN_frozenbn_syncbn_1x.yaml"]["segm"] == \
        {"AP": 36.0, "AP50": 57.7, "AP75": 38.6}
    assert PAPER_RESULTS["mabn/mask_rcnn_R50_FPN_mabn_none_scratch_2x.yaml"]["segm"]["AP"] == 31.61
    assert PAPER_RESULTS["mabn/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.yaml"]["bbox"]["AP"] == 36.50
    assert PAPER_RESULTS["mabn/mask_rcnn_R50_FPN_syncbn_syncbn_finetune_2x.yaml"]["bbox"]["AP"] == 38.25
    assert PAPER_RESULTS["mabn/mask_rcnn_R50_FPN_brn_none_scratch_2x.yaml"]["segm"]["AP"] == 29.16
    assert PAPER_RESULTS["mabn/mask_rcnn_R50_FPN_brn_brn_scratch_2x.yaml"]["bbox"] == \
        {"AP": 34.07, "AP50": 52.66, "AP75": 37.12}
    assert PAPER_RESULTS["mabn/retinanet_R50_FPN_mabn_mabn_scratch_2x.yaml"]["bbox"] == \
        {"AP": 29.52, "AP50": 45.69, "AP75": 31.14}
    # BCN tables list AP / AP50 / AP75 / APl / APm / APs
    assert PAPER_RESULTS["bcn/mask_rcnn_R50_FPN_bcnws_bcnws_2x.yaml"]["segm"] == \
        {"AP": 37.3, "AP50": 59.4, "AP75": 39.8, "APl": 55.0, "APm": 40.1, "APs": 17.9}
    assert PAPER_RESULTS["bcn/faster_rcnn_R50_FPN_gn_gn_1x.yaml"]["bbox"] == \
        {"AP": 38.0, "AP50": 59.1, "AP75": 41.2, "APl": 49.5, "APm": 40.9, "APs": 22.4}
    assert PAPER_RESULTS["bcn/faster_rcnn_R101_FPN_gnws_gnws_1x.yaml"]["bbox"] == {"AP50": 62.8, "APm": 45.2}


# ------------------------------------------------------------------------------------------------
# The unshrunk paper configs

def _comment_fields(name):
    """The comment header: {"Paper": text, "Reported": text, ...} (continuation lines joined)."""
    fields, key = {}, None
    with open(os.path.join(CONFIG_ROOT, name)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            match = re.match(r"# (\w+): (.*)", line)
            if match:
                key = match.group(1)
                fields[key] = match.group(2).strip()
            elif key and line.startswith("#   "):
                fields[key] += " " + line[1:].strip()
    return fields


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_comment_header_states_paper_table_ap_batch_and_schedule(name):
    row, fields = row_of(name), _comment_fields(name)
    assert {"Paper", "Reported", "Batch", "Schedule", "Departures"} <= set(fields), (name, list(fields))
    assert re.search(rf"\b{row.paper}\b", fields["Paper"]) and re.search(rf"\bTable {row.table}\b", fields["Paper"])
    stated = {float(v) for v in re.findall(r"\d+\.\d+", fields["Reported"])}
    result = PAPER_RESULTS[name]
    for task in ("bbox", "segm"):
        for metric, value in result.get(task, {}).items():
            assert value in stated, (name, task, metric, value)
    ims, per_gpu, _, max_iter, steps = expected_solver(row)
    assert re.search(rf"\b{per_gpu} images? per GPU x {ims // per_gpu} GPUs = {ims} images per iteration",
                     fields["Batch"]), fields["Batch"]
    assert f"--num-gpus {ims // per_gpu}" in fields["Batch"]
    for number in (max_iter,) + steps:
        assert f"{number:,}" in fields["Schedule"], (name, number)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_matches_its_row(name, configs):
    row, cfg = row_of(name), configs(name)
    m, s, solver = cfg.MODEL, cfg.MODEL.SMALLBN, cfg.SOLVER
    # architecture
    if row.arch == "retinanet":
        assert m.META_ARCHITECTURE == "RetinaNet"
        assert m.BACKBONE.NAME == "build_smallbn_retinanet_resnet_fpn_backbone"
    else:
        assert m.META_ARCHITECTURE == "GeneralizedRCNN"
        assert m.BACKBONE.NAME == "build_smallbn_resnet_fpn_backbone"
        assert (m.ROI_BOX_HEAD.NAME, m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC) == ("FastRCNNConvFCHead", 4, 1)
        assert (m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.FC_DIM) == (256, 1024)
        assert m.ROI_HEADS.NAME == "StandardROIHeads"
    assert m.MASK_ON == (row.arch == "mask")
    if row.arch == "mask":
        assert (m.ROI_MASK_HEAD.NAME, m.ROI_MASK_HEAD.NUM_CONV) == ("MaskRCNNConvUpsampleHead", 4)
    assert m.RESNETS.DEPTH == row.depth
    # norms and conv type
    assert m.RESNETS.NORM == row.backbone
    assert m.FPN.NORM == row.heads
    assert m.ROI_BOX_HEAD.NORM == (row.heads if row.arch != "retinanet" else "")
    assert m.ROI_MASK_HEAD.NORM == (row.heads if row.arch == "mask" else "")
    assert m.RETINANET.NORM == (row.heads if row.arch == "retinanet" else "")
    assert s.CONV == row.conv
    assert m.BACKBONE.FREEZE_AT == expected_freeze_at(row)
    # schedule, learning rate, batch
    ims, per_gpu, lr, max_iter, steps = expected_solver(row)
    assert (solver.IMS_PER_BATCH, solver.BASE_LR, solver.MAX_ITER, tuple(solver.STEPS)) == (ims, lr, max_iter, steps)
    assert s.PAPER_IMS_PER_GPU == per_gpu
    assert (solver.WARMUP_ITERS, solver.WARMUP_METHOD) == (500, "linear")
    assert solver.WARMUP_FACTOR == pytest.approx(1 / 3)
    assert (solver.MOMENTUM, solver.WEIGHT_DECAY, solver.GAMMA) == (0.9, 0.0001, 0.1)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS  # the epoch conversion assumes it
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN) == ((800,), 1333)
    assert cfg.VERSION == 2
    # the methods' settings
    if row.paper == "CBN":
        assert (s.CBN.WINDOW_SIZE, s.CBN.BURNIN_EPOCHS, s.CBN.RHO) == (4, 3.0, 1.0)
        assert solver.WEIGHT_DECAY_NORM == 0.0001
        if row.backbone == "GN":  # GN backbone from detectron2's GN-pretrained model (stride in the 3x3)
            assert m.WEIGHTS == f"catalog://ImageNetPretrained/FAIR/R-{row.depth}-GN"
            assert not m.RESNETS.STRIDE_IN_1X1
        else:
            assert m.WEIGHTS == f"detectron2://ImageNetPretrained/MSRA/R-{row.depth}.pkl"
            assert m.RESNETS.STRIDE_IN_1X1
    elif row.paper == "MABN":
        assert (s.MABN.MOMENTUM, s.MABN.CLIP_LAMBDA, s.MABN.CLIP_WARMUP_ITERS) == (0.98, 5.0, 1000)
        assert m.RESNETS.STRIDE_IN_1X1
        heads_normalized_mabn = row.backbone == "MABN" and row.heads == "MABN"
        # Tables 5 and 6 captions: m = 32; Table 3: m = 16; Table 7 gives none (default 16)
        assert s.MABN.BUFFER_SIZE == (32 if heads_normalized_mabn and row.table in ("5", "6") else 16)
        assert s.MABN.HEADS_WARMUP_ITERS == (10000 if heads_normalized_mabn else 100)
        assert (s.MABN.WARMUP_ITERS, s.MABN.FPN_WARMUP_ITERS) == (100, 100)
        if "BRN" in (row.backbone, row.heads):  # Ioffe's limits and ramp; momentum 0.98 (Tables 3, 5 captions)
            b = s.BRN
            assert (b.MOMENTUM, b.R_MAX, b.D_MAX) == (0.98, 3.0, 5.0)
            assert (b.WARMUP_ITERS, b.D_MAX_ITERS, b.R_MAX_ITERS) == (5000, 25000, 40000)
        if row.variant == "scratch":
            assert m.WEIGHTS == "" and s.INIT == "he"
        else:
            assert m.WEIGHTS == "weights/R-50-WC.pkl" and s.INIT == ""
    else:
        tag = {("GN", "plain"): "GN", ("GN", "ws"): "GN-WS", ("BCN", "auto"): "BCN-WS"}[row.backbone, row.conv]
        assert m.WEIGHTS == f"weights/R-{row.depth}-{tag}.pkl"
        assert not m.RESNETS.STRIDE_IN_1X1
        assert (s.BCN.NUM_GROUPS, s.BCN.EPS, s.BCN.UPDATE_RATE_MODE, s.BCN.UPDATE_RATE) == (32, 1e-5, "lr", 0.0)
        assert (s.WS.MODE, s.WS.EPS) == ("std", 1e-5)
        assert cfg.INPUT.FORMAT == "RGB"
        assert list(m.PIXEL_MEAN) == [123.675, 116.28, 103.53] and list(m.PIXEL_STD) == [58.395, 57.12, 57.375]
    if row.arch == "retinanet":
        r = m.RETINANET
        assert list(r.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"]
        assert list(m.RESNETS.OUT_FEATURES) == list(m.FPN.IN_FEATURES) == ["res3", "res4", "res5"]
        assert (r.NUM_CONVS, r.PRIOR_PROB, r.FOCAL_LOSS_GAMMA, r.FOCAL_LOSS_ALPHA) == (4, 0.01, 2.0, 0.25)
        assert (list(r.IOU_THRESHOLDS), list(r.IOU_LABELS)) == ([0.4, 0.5], [0, -1, 1])
        sizes = m.ANCHOR_GENERATOR.SIZES
        assert len(sizes) == 5
        for level, scales in enumerate(sizes):  # 3 scales per octave from 32 * 2^level
            assert scales == pytest.approx([32 * 2 ** level * 2 ** (k / 3) for k in range(3)], rel=1e-4)
        assert list(m.ANCHOR_GENERATOR.ASPECT_RATIOS) == [[0.5, 1.0, 2.0]]


# ------------------------------------------------------------------------------------------------
# Tiny models: every config, quickstart included

def tiny(cfg):
    """The same config at tiny size on CPU: norms, conv types, frozen stages and the methods'
    hyper-parameters are left as they are."""
    cfg = cfg.clone()
    m = cfg.MODEL
    m.DEVICE, m.WEIGHTS = "cpu", ""
    m.RESNETS.DEPTH, m.RESNETS.RES2_OUT_CHANNELS = 18, 64
    m.FPN.OUT_CHANNELS = 32  # GN and BCN use 32 groups: channels stay multiples of 32
    m.ROI_BOX_HEAD.CONV_DIM, m.ROI_BOX_HEAD.FC_DIM, m.ROI_MASK_HEAD.CONV_DIM = 32, 64, 32
    m.ROI_HEADS.NUM_CLASSES = m.RETINANET.NUM_CLASSES = 2
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = m.RPN.BATCH_SIZE_PER_IMAGE = 64
    m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN = 200, 64
    m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST = 100, 50
    m.RETINANET.TOPK_CANDIDATES_TEST = 100
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    return cfg


STOCK = {"BN": torch.nn.BatchNorm2d, "SyncBN": torch.nn.SyncBatchNorm, "GN": torch.nn.GroupNorm,
         "FrozenBN": FrozenBatchNorm2d, "naiveSyncBN": NaiveSyncBatchNorm}
OURS = {"CBN": CrossIterationBatchNorm2d, "MABN": MovingAverageBatchNorm2d, "BCN": BatchChannelNorm2d,
        "BRN": BatchRenorm2d}


def conv_class(norm, conv):
    if norm == "CBN":
        return CBNConv2d
    if conv == "auto":
        return {"MABN": CenteredConv2d, "BCN": WSConv2d}.get(norm, Conv2d)
    return {"ws": WSConv2d, "centered": CenteredConv2d, "plain": Conv2d}[conv]


def normed_convs(module):
    return [c for c in module.modules() if isinstance(c, torch.nn.Conv2d) and getattr(c, "norm", None) is not None]


def check_norm(norm, name, frozen, where):
    """``norm`` is config norm ``name``; in a frozen stage, the frozen form of it."""
    if frozen and name in ("BN", "SyncBN", "naiveSyncBN", "FrozenBN"):
        assert type(norm) is FrozenBatchNorm2d, where
        return
    expected = OURS.get(name) or STOCK[name]
    assert type(norm) is expected, (where, type(norm).__name__, name)
    if name == "GN":
        assert norm.num_groups == 32, where
    params = list(norm.parameters())
    assert all(p.requires_grad != frozen for p in params), where
    if name in OURS:
        assert norm.frozen == frozen, where


def check_place(module, norm, conv, count, frozen=False, where=""):
    """``module`` has ``count`` normed convs, each with norm ``norm`` and the matching conv class."""
    convs = normed_convs(module)
    if not norm:
        assert not convs, where
        return
    assert len(convs) == count, (where, len(convs))
    for c in convs:
        assert type(c) is conv_class(norm, conv), (where, type(c).__name__, norm, conv)
        check_norm(c.norm, norm, frozen, where)
        assert all(p.requires_grad != frozen for p in c.parameters(recurse=False)), where


def check_backbone(bottom_up, norm, conv, freeze_at):
    stages = [("stem", bottom_up.stem)] + [(n, getattr(bottom_up, n)) for n in ("res2", "res3", "res4", "res5")]
    counts = {"stem": 1, "res2": 4, "res3": 5, "res4": 5, "res5": 5}  # R18: 2 blocks of 2 convs, + shortcut
    for index, (name, stage) in enumerate(stages):
        frozen = index < freeze_at  # FREEZE_AT 1: stem; 2: stem and res2
        check_place(stage, norm, conv, counts[name], frozen=frozen, where=f"backbone {name}")


QUICKSTART_NORMS = {"bn": "BN", "gn": "GN", "cbn": "CBN", "mabn": "MABN", "bcn": "BCN", "brn": "BRN",
                    "syncbn": "naiveSyncBN"}  # file name -> the norm everywhere


def model_intent(name, cfg):
    """(arch, backbone norm, heads norm, conv, FREEZE_AT) that the built model must show."""
    if name in ROWS or name in ALIASES:
        row = row_of(name)
        return row.arch, row.backbone, row.heads, row.conv, expected_freeze_at(row)
    if name.startswith("pretrained/"):  # <backbone norm>_<FPN/heads norm>, fine-tuned with FREEZE_AT 2
        backbone, heads = re.search(r"_FPN_([a-z]+)_([a-z]+)\.yaml$", name).groups()
        norms = {**QUICKSTART_NORMS, "frozenbn": "FrozenBN", "bcnws": "BCN"}
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
        assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
        return "mask", norms[backbone], norms[heads], "auto", 2
    # quickstart: one norm everywhere (the file name), trained from scratch
    norm = QUICKSTART_NORMS[re.search(r"_FPN_([a-z]+)", name).group(1)]
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    return "mask", norm, norm, "auto", 0


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_tiny_model_has_the_norms_convs_and_frozen_stages_of_the_config(name, configs):
    cfg = tiny(configs(name))
    arch, backbone_norm, heads, conv, freeze_at = model_intent(name, cfg)
    s = cfg.MODEL.SMALLBN
    # looked up at call time: `import d2_smallbn` wraps detectron2's build_model (a name imported
    # from detectron2 before that import would build without the conversion pass)
    model = detectron2.modeling.build_model(cfg)
    check_converted(model)
    check_backbone(model.backbone.bottom_up, backbone_norm, conv, freeze_at)
    fpn = [c for c in model.backbone.lateral_convs + model.backbone.output_convs]
    levels = 3 if arch == "retinanet" else 4
    assert len(fpn) == 2 * levels
    check_place(torch.nn.ModuleList(fpn), heads, conv, 2 * levels, where="FPN")
    if arch == "retinanet":
        assert [type(c) for c in normed_convs(model.backbone.top_block)] == []  # P6/P7 convs stay plain
        head = model.head
        assert type(head.cls_score) is torch.nn.Conv2d and type(head.bbox_pred) is torch.nn.Conv2d
        for subnet in (head.cls_subnet, head.bbox_subnet):
            convs = [c for c in subnet if isinstance(c, torch.nn.Conv2d)]
            assert len(convs) == 4
            if heads in OURS:  # one norm per FPN level, inside the converted conv
                for c in convs:
                    assert type(c) is conv_class(heads, conv) and isinstance(c.norm, PerLevelNorm)
                    assert len(c.norm.norms) == 5 and all(type(n) is OURS[heads] for n in c.norm.norms)
            else:
                norms = [n for n in subnet if isinstance(n, CycleBatchNormList)]
                assert len(norms) == 4 and all(type(c) is torch.nn.Conv2d for c in convs)
                assert all(len(n) == 5 and all(type(b) is STOCK[heads] for b in n) for n in norms)
    else:
        box = model.roi_heads.box_head
        assert type(box) is FastRCNNConvFCHead
        assert len(box.conv_norm_relus) == 4 and len(box.fcs) == 1 and type(box.fcs[0]) is torch.nn.Linear
        check_place(box, heads, conv, 4, where="box head")
        assert type(model.proposal_generator.rpn_head.conv) is Conv2d  # the RPN head stays plain
        assert not normed_convs(model.proposal_generator)
        assert model.roi_heads.mask_on == (arch == "mask")
        if arch == "mask":
            mask = model.roi_heads.mask_head
            assert type(mask) is MaskRCNNConvUpsampleHead and len(mask.conv_norm_relus) == 4
            check_place(mask, heads, conv, 4, where="mask head")
            assert type(mask.predictor) is Conv2d and type(mask.deconv).__name__ == "ConvTranspose2d"
    # the layers got the config's hyper-parameters
    named = list(model.named_modules())
    for module_name, module in named:
        if isinstance(module, CrossIterationBatchNorm2d):
            assert (module.window_size, module.rho) == (s.CBN.WINDOW_SIZE, s.CBN.RHO)
        if isinstance(module, MovingAverageBatchNorm2d):
            assert (module.momentum, module.buffer_size) == (s.MABN.MOMENTUM, s.MABN.BUFFER_SIZE)
            if module_name.startswith("backbone.bottom_up."):
                assert module.warmup_iters == s.MABN.WARMUP_ITERS, module_name
            elif module_name.startswith("backbone."):
                assert module.warmup_iters == s.MABN.FPN_WARMUP_ITERS, module_name
            else:
                assert module.warmup_iters == s.MABN.HEADS_WARMUP_ITERS, module_name
        if isinstance(module, BatchChannelNorm2d):
            assert module.num_groups == s.BCN.NUM_GROUPS
            assert float(module.update_rate) == pytest.approx(cfg.SOLVER.BASE_LR)  # never silently GN
        if isinstance(module, WSConv2d):
            assert (module.ws_mode, module.ws_eps) == (s.WS.MODE, s.WS.EPS)
        if isinstance(module, BatchRenorm2d):
            assert (module.momentum, module.r_max, module.d_max) == (s.BRN.MOMENTUM, s.BRN.R_MAX, s.BRN.D_MAX)
            assert (module.warmup_iters, module.r_max_iters, module.d_max_iters) == \
                (s.BRN.WARMUP_ITERS, s.BRN.R_MAX_ITERS, s.BRN.D_MAX_ITERS)


# ------------------------------------------------------------------------------------------------
# Training: one config per distinct (architecture x norm setting)
#
# The architecture is the meta-architecture (a Mask R-CNN run also runs every Faster R-CNN code
# path, so R-CNN configs are grouped with Mask R-CNN as the representative); the norm setting is
# the backbone norm, the FPN/head norm, the resulting conv class and whether stages are frozen.
# Depth is not part of it: tiny models are R18. The quickstart configs are trained by the
# quickstart's own tests and only built here.

def _setting(cfg):
    m = cfg.MODEL
    heads = (m.FPN.NORM, m.RETINANET.NORM) if m.META_ARCHITECTURE == "RetinaNet" else \
        (m.FPN.NORM, m.ROI_BOX_HEAD.NORM) + ((m.ROI_MASK_HEAD.NORM,) if m.MASK_ON else ())
    # in every paper row the FPN and the heads share one norm, so a Mask R-CNN setting covers Faster's
    norms = (m.RESNETS.NORM,) + tuple(sorted(set(heads)))
    convs = tuple(conv_class(n, m.SMALLBN.CONV).__name__ if n else "" for n in norms)
    return m.META_ARCHITECTURE, norms, convs, m.BACKBONE.FREEZE_AT > 0


def _training_groups():
    groups = {}
    for name in PAPER_CONFIGS:
        groups.setdefault(_setting(load(name)), []).append(name)
    # representative: a Mask R-CNN config where the group has one (R50 before R101)
    def preference(n):
        return "/mask_rcnn" not in "/" + n, "_R50_" not in n, n

    return {sorted(names, key=preference)[0]: names for names in groups.values()}


TRAINING_GROUPS = _training_groups()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return register_generated("smallbn_configs_tiny", tmp_path_factory.mktemp("config_images"))


def uses_our_norms(cfg):
    m = cfg.MODEL
    return bool({m.RESNETS.NORM, m.FPN.NORM, m.ROI_BOX_HEAD.NORM, m.ROI_MASK_HEAD.NORM, m.RETINANET.NORM} & set(OURS))


def trainable(cfg, dataset, output_dir):
    """The tiny config with short state schedules, so that 2 iterations reach every code path of
    our norms: CBN's window after 1 burn-in iteration, MABN's moving averages and clipping after 1,
    BRN's r and d after 1.
    Configs with stock norms only have no such state: 1 iteration."""
    iters = 2 if uses_our_norms(cfg) else 1
    cfg = tiny(cfg)
    s = cfg.MODEL.SMALLBN
    s.CBN.BURNIN_EPOCHS, s.CBN.BURNIN_ITERS = 0.0, 1
    s.MABN.BUFFER_SIZE = 2
    s.MABN.WARMUP_ITERS = s.MABN.FPN_WARMUP_ITERS = s.MABN.HEADS_WARMUP_ITERS = s.MABN.CLIP_WARMUP_ITERS = 1
    s.BRN.WARMUP_ITERS, s.BRN.R_MAX_ITERS, s.BRN.D_MAX_ITERS = 1, 2, 2  # the 2nd iteration renormalizes
    s.PAPER_IMS_PER_GPU = 2
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 2, iters, (1,) if iters > 1 else ()
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = 1, 10 ** 6
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = output_dir
    cfg.SEED = 1
    return cfg


def test_training_groups_cover_every_paper_config_once():
    covered = sorted(n for names in TRAINING_GROUPS.values() for n in names)
    assert covered == PAPER_CONFIGS
    assert len(TRAINING_GROUPS) <= 22  # the CI budget: one training each (20, + 2 for the BRN rows)


@pytest.mark.parametrize("name", sorted(TRAINING_GROUPS))
def test_training_steps_of_each_norm_setting(name, configs, tiny_dataset, tmp_path):
    cfg = trainable(configs(name), tiny_dataset, str(tmp_path))
    trainer = SmallBNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # finished
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == cfg.SOLVER.MAX_ITER and all(math.isfinite(v) for v in losses), losses
    model = trainer.model
    for module in model.modules():
        if isinstance(module, CrossIterationBatchNorm2d) and not module.frozen:
            assert int(module.num_stored) == 1  # the window was used after burn-in
        if isinstance(module, BatchChannelNorm2d) and not module.frozen:
            assert float(module.update_rate) > 0
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


# ------------------------------------------------------------------------------------------------
# Every build path: YAML configs through the patched build_model (yacs and OmegaConf) and through
# detectron2's own build_model + convert_model; LazyConfigs (.py) through the lazy entry point, the
# user's instantiate + convert_model (LazyConfig or a plain dict of settings) and the model zoo.
# Each path gives the same model, every norm named by the config built with the config's settings.

# layer attribute -> MODEL.SMALLBN.<norm> key, per norm (written here, independently of the table)
LAYER_SETTINGS = {
    "CBN": {"window_size": "WINDOW_SIZE", "burnin_iters": "BURNIN_ITERS", "rho": "RHO", "momentum": "MOMENTUM",
            "eps": "EPS"},
    "MABN": {"momentum": "MOMENTUM", "buffer_size": "BUFFER_SIZE", "clip_lambda": "CLIP_LAMBDA",
             "clip_warmup_iters": "CLIP_WARMUP_ITERS", "eps": "EPS"},
    "BCN": {"num_groups": "NUM_GROUPS", "eps": "EPS"},
    "BRN": {"momentum": "MOMENTUM", "r_max": "R_MAX", "d_max": "D_MAX", "warmup_iters": "WARMUP_ITERS",
            "r_max_iters": "R_MAX_ITERS", "d_max_iters": "D_MAX_ITERS", "eps": "EPS"},
}
MABN_WARMUP_KEY = {"backbone": "WARMUP_ITERS", "fpn": "FPN_WARMUP_ITERS", "heads": "HEADS_WARMUP_ITERS"}


def scope_of(module_name):
    if module_name.startswith("backbone.bottom_up."):
        return "backbone"
    return "fpn" if module_name.startswith("backbone.") else "heads"


def check_settings(model, s, base_lr):
    """Every norm of ours carries the settings ``s`` (MODEL.SMALLBN as a dict) and sits after the conv
    class it needs, and no norm is pending."""
    check_converted(model)
    seen = set()
    for module_name, module in model.named_modules():
        name = next((n for n, cls in OURS.items() if type(module) is cls), None)
        if name is None:
            continue
        seen.add(name)
        for attr, key in LAYER_SETTINGS[name].items():
            assert getattr(module, attr) == s[name][key], (module_name, attr)
        if name == "MABN":
            assert module.warmup_iters == s["MABN"][MABN_WARMUP_KEY[scope_of(module_name)]], module_name
        if name == "BCN":
            rate = base_lr if s["BCN"]["UPDATE_RATE_MODE"] == "lr" else s["BCN"]["UPDATE_RATE"]
            assert float(module.update_rate) == pytest.approx(rate), module_name
    for conv in normed_convs(model):
        name = next((n for n, cls in OURS.items() if type(conv.norm) is cls), None)
        if name is not None:  # (RetinaNet's per-level norms are checked by the tiny-model test)
            assert type(conv) is conv_class(name, s["CONV"]), (type(conv).__name__, name)
        if isinstance(conv, WSConv2d):
            assert (conv.ws_mode, conv.ws_eps) == (s["WS"]["MODE"], s["WS"]["EPS"])
    return seen


def structure(model):
    """(module name, class, trainable) of every module and the frozen flag of our norms."""
    return [(n, type(m).__name__, getattr(m, "frozen", None), tuple(p.requires_grad for p in m.parameters(False)))
            for n, m in model.named_modules()]


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_yaml_config_builds_the_same_model_through_every_build_path(name, configs):
    from omegaconf import OmegaConf

    cfg = tiny(configs(name))
    build = detectron2.modeling.build_model  # d2_smallbn's: detectron2's + convert_model
    paths = {
        "build_model(yacs)": lambda: build(cfg),
        "build_model(OmegaConf)": lambda: build(OmegaConf.create(cfg.dump())),
        "convert_model(detectron2 build_model)": lambda: d2_smallbn.convert_model(build._smallbn_original(cfg), cfg),
    }
    s = yaml_settings(cfg)
    built = {}
    for path, make in paths.items():
        torch.manual_seed(0)
        built[path] = make()
        check_settings(built[path], s, cfg.SOLVER.BASE_LR)
    reference = structure(built["build_model(yacs)"])
    for path, model in built.items():
        assert structure(model) == reference, path


def yaml_settings(cfg):
    import yaml

    return yaml.safe_load(cfg.MODEL.SMALLBN.dump())


PY_CONFIGS = list_configs(".py")
# each LazyConfig and its YAML twin: the same setting
PY_TWINS = {"lazy/mask_rcnn_R50_FPN_cbn.py": "mask_rcnn_R50_FPN_cbn.yaml",
            "lazy/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.py": "mabn/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.yaml",
            "lazy/mask_rcnn_R50_FPN_bcnws_bcnws_2x.py": "bcn/mask_rcnn_R50_FPN_bcnws_bcnws_2x.yaml"}


def tiny_lazy(cfg):
    """A LazyConfig's model at the size of ``tiny``: R18, 32-channel FPN and heads, 2 classes."""
    from detectron2.layers import ShapeSpec

    cfg = copy.deepcopy(cfg)
    model = cfg.model
    model.backbone.bottom_up.stages.depth = 18
    del model.backbone.bottom_up.stages.stride_in_1x1  # basic blocks have none
    model.backbone.out_channels = 32
    model.proposal_generator.head.in_channels = 32
    heads = model.roi_heads
    heads.num_classes = 2
    heads.box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
    heads.box_head.conv_dims, heads.box_head.fc_dims = [32] * 4, [64]
    heads.box_predictor.input_shape = ShapeSpec(channels=64)
    heads.mask_head.input_shape = ShapeSpec(channels=32, width=14, height=14)
    heads.mask_head.conv_dims = [32] * 5
    cfg.train.device = "cpu"
    return cfg


def test_every_lazy_config_has_a_yaml_twin():
    assert sorted(PY_TWINS) == PY_CONFIGS and len(PY_CONFIGS) >= 3
    from d2_smallbn import model_zoo

    for name in PY_CONFIGS:  # the model zoo serves them by name, like detectron2's
        assert model_zoo.get_config(name).model.roi_heads.box_head.fc_dims == [1024]


@pytest.mark.parametrize("name", PY_CONFIGS)
def test_lazy_config_builds_its_yaml_twins_model_through_every_build_path(name, configs):
    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    from d2_smallbn import model_zoo
    from d2_smallbn.engine.lazy import build_model

    cfg = tiny_lazy(model_zoo.get_config(name))
    values = OmegaConf.to_container(cfg.smallbn)
    paths = {
        "lazy entry point": lambda: build_model(cfg),
        "instantiate + convert_model(model, cfg)": lambda: d2_smallbn.convert_model(instantiate(cfg.model), cfg),
        "instantiate + convert_model(model, dict)": lambda: d2_smallbn.convert_model(
            instantiate(cfg.model), values, base_lr=cfg.optimizer.lr),
    }
    twin = tiny(configs(PY_TWINS[name]))
    s = yaml_settings(twin)  # the twin's complete settings: the LazyConfig's (with defaults) must equal them
    assert cfg.optimizer.lr == twin.SOLVER.BASE_LR
    torch.manual_seed(0)
    reference = structure(detectron2.modeling.build_model(twin))
    for path, make in paths.items():
        model = make()
        assert check_settings(model, s, twin.SOLVER.BASE_LR), path
        assert structure(model) == reference, path


def test_model_zoo_get_builds_a_lazy_and_a_yaml_config_converted(tmp_path):
    from d2_smallbn import model_zoo

    for name in ("lazy/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.py", "mabn/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.yaml"):
        model = model_zoo.get(name, device="cpu")
        check_converted(model)
        assert sum(isinstance(m, MovingAverageBatchNorm2d) for m in model.modules()) == 53 + 8 + 8
