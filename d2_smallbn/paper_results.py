"""What the papers reported for each config, so tools can show it beside a measured result.

``PAPER_RESULTS[config_name]`` (the config's path relative to configs/) holds the paper, table and
row, and per task ("bbox", "segm") the reported metrics under COCO's names (AP, AP50, AP75, APs,
APm, APl); a metric the paper did not report (or that the extracted text garbles) is absent.
Numbers come from the papers' tables (see docs/configs.md); an optional "note" says what is
missing and why.

Papers: "CBN" = Yao et al., Cross-Iteration Batch Normalization, CVPR 2021 (Tables 4-5);
"MABN" = Yan et al., Towards Stabilizing Batch Statistics in Backward Propagation of Batch
Normalization, ICLR 2020 (appendix B.3: Tables 3, 5, 6, 7); "BCN" = Qiao et al., Micro-Batch
Training with Batch-Channel Normalization and Weight Standardization, 2019 (Tables 9-10).
"""

_COCO = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_BCN_ORDER = ("AP", "AP50", "AP75", "APl", "APm", "APs")  # the BCN paper's column order


def _metrics(values, names=_COCO):
    """``"37.7 / 59.0 / 40.7"`` -> {"AP": 37.7, "AP50": 59.0, "AP75": 40.7} (names in order)."""
    numbers = [float(v) for v in values.split("/")]
    assert len(numbers) <= len(names), values
    return dict(zip(names, numbers))


def _row(paper, table, row, bbox, segm=None, names=_COCO, note=None):
    entry = {"paper": paper, "table": table, "row": row, "bbox": _metrics(bbox, names)}
    if segm is not None:
        entry["segm"] = _metrics(segm, names)
    if note:
        entry["note"] = note
    return entry


def _cbn_table4(name, row, bbox):
    return {f"cbn/faster_rcnn_R50_FPN_{name}_1x.yaml": _row("CBN", "4", "Faster R-CNN R50-FPN, " + row, bbox)}


PAPER_RESULTS = {}

# ---- CBN, Table 4: Faster R-CNN R50-FPN, 4conv1fc; backbone norm / norm in the FPN and box head.
# Metrics AP / AP50 / AP75 / APs / APm / APl.
for _name, _row_text, _bbox in (
    ("frozenbn_none", "frozen-BN backbone, no norm in FPN and head", "36.9 / 58.2 / 39.9 / 21.2 / 40.8 / 46.9"),
    ("frozenbn_bn", "frozen-BN backbone, BN in FPN and head", "36.3 / 57.3 / 39.2 / 20.8 / 39.7 / 47.3"),
    ("frozenbn_syncbn", "frozen-BN backbone, SyncBN in FPN and head", "37.7 / 58.5 / 41.1 / 22.0 / 40.9 / 49.0"),
    ("frozenbn_gn", "frozen-BN backbone, GN in FPN and head", "37.8 / 59.0 / 40.8 / 22.3 / 41.2 / 48.4"),
    ("frozenbn_cbn", "frozen-BN backbone, CBN in FPN and head", "37.7 / 59.0 / 40.7 / 22.1 / 40.9 / 48.8"),
    ("bn_bn", "BN in backbone (stem, res2 frozen), FPN and head", "35.5 / 56.4 / 38.7 / 19.7 / 38.8 / 47.3"),
    ("syncbn_syncbn", "SyncBN in backbone (stem, res2 frozen), FPN and head",
     "37.9 / 58.5 / 41.1 / 21.7 / 41.5 / 49.7"),
    ("gn_gn", "GN in backbone (stem, res2 frozen), FPN and head", "37.8 / 59.1 / 40.9 / 22.4 / 41.2 / 49.0"),
    ("cbn_cbn", "CBN in backbone (stem, res2 frozen), FPN and head", "37.3 / 57.7 / 39.3 / 21.9 / 40.8 / 48.2"),
):
    PAPER_RESULTS.update(_cbn_table4(_name, _row_text, _bbox))

# ---- CBN, Table 5: frozen-BN backbone, the norm in the FPN and heads. Faster: AP .. APl;
# Mask: box AP / AP50 / AP75 and mask AP / AP50 / AP75 (the paper gives no size breakdown).
for _depth, _norm, _label, _bbox in (
    ("101", "gn", "GN", "39.3 / 60.6 / 42.7 / 22.5 / 42.5 / 51.3"),
    ("101", "syncbn", "SyncBN", "39.2 / 59.8 / 43.0 / 22.2 / 42.9 / 51.6"),
    ("101", "cbn", "CBN", "39.2 / 60.0 / 42.6 / 22.3 / 42.6 / 51.1"),
):
    PAPER_RESULTS[f"cbn/faster_rcnn_R{_depth}_FPN_frozenbn_{_norm}_1x.yaml"] = _row(
        "CBN", "5", f"Faster R-CNN R{_depth}-FPN, frozen-BN backbone, {_label} in FPN and head", _bbox)
for _depth, _norm, _label, _bbox, _segm in (
    ("50", "gn", "GN", "38.6 / 59.8 / 41.9", "35.0 / 56.7 / 37.3"),
    ("50", "syncbn", "SyncBN", "38.5 / 58.9 / 42.3", "34.7 / 56.3 / 36.8"),
    ("50", "cbn", "CBN", "38.5 / 59.2 / 42.1", "34.6 / 56.4 / 36.6"),
    ("101", "gn", "GN", "40.3 / 61.2 / 44.2", "36.6 / 58.5 / 39.2"),
    ("101", "syncbn", "SyncBN", "40.3 / 60.8 / 44.2", "36.0 / 57.7 / 38.6"),
    ("101", "cbn", "CBN", "40.1 / 60.5 / 44.1", "35.8 / 57.3 / 38.5"),
):
    PAPER_RESULTS[f"cbn/mask_rcnn_R{_depth}_FPN_frozenbn_{_norm}_1x.yaml"] = _row(
        "CBN", "5", f"Mask R-CNN R{_depth}-FPN, frozen-BN backbone, {_label} in FPN and heads", _bbox, _segm)
# The CBN paper's default Mask R-CNN setting, at the top level of configs/ (same row as above).
PAPER_RESULTS["mask_rcnn_R50_FPN_cbn.yaml"] = dict(PAPER_RESULTS["cbn/mask_rcnn_R50_FPN_frozenbn_cbn_1x.yaml"])

# ---- MABN: Mask R-CNN R50-FPN (4conv1fc) 2x; box AP / AP50 / AP75, mask AP / AP50 / AP75.
for _table, _file, _row_text, _bbox, _segm in (
    ("3", "bn_none_scratch", "from scratch, BN in the backbone only", "30.41 / 48.47 / 32.70", "27.91 / 45.79 / 29.33"),
    ("3", "syncbn_none_scratch", "from scratch, SyncBN in the backbone only",
     "34.81 / 55.18 / 37.69", "31.69 / 51.86 / 33.68"),
    ("3", "mabn_none_scratch", "from scratch, MABN in the backbone only",
     "34.85 / 54.97 / 38.00", "31.61 / 51.88 / 33.64"),
    ("3", "brn_none_scratch", "from scratch, BRN in the backbone only",
     "31.93 / 50.95 / 34.48", "29.16 / 48.16 / 30.69"),
    ("5", "bn_bn_scratch", "from scratch, BN in backbone, FPN and both heads",
     "32.38 / 50.44 / 35.47", "29.07 / 47.68 / 30.75"),
    ("5", "syncbn_syncbn_scratch", "from scratch, SyncBN in backbone, FPN and both heads",
     "36.81 / 56.23 / 40.08", "33.11 / 53.46 / 35.28"),
    ("5", "mabn_mabn_scratch", "from scratch, MABN in backbone, FPN and both heads",
     "36.50 / 55.79 / 40.17", "32.69 / 52.78 / 34.71"),
    ("5", "brn_brn_scratch", "from scratch, BRN in backbone, FPN and both heads",
     "34.07 / 52.66 / 37.12", "30.98 / 50.03 / 32.93"),
    ("6", "syncbn_syncbn_finetune", "fine-tuned from a weight-centralized ImageNet R50, SyncBN",
     "38.25 / 57.81 / 42.01", "34.22 / 54.97 / 36.34"),
    ("6", "mabn_mabn_finetune", "fine-tuned from a weight-centralized ImageNet R50, MABN",
     "38.42 / 58.19 / 41.99", "34.12 / 55.10 / 36.12"),
):
    PAPER_RESULTS[f"mabn/mask_rcnn_R50_FPN_{_file}_2x.yaml"] = _row(
        "MABN", _table, "Mask R-CNN R50-FPN 2x, " + _row_text, _bbox, _segm)
for _norm, _label, _bbox in (("syncbn", "SyncBN", "29.80 / 46.21 / 31.47"), ("mabn", "MABN", "29.52 / 45.69 / 31.14")):
    PAPER_RESULTS[f"mabn/retinanet_R50_FPN_{_norm}_{_norm}_scratch_2x.yaml"] = _row(
        "MABN", "7", f"RetinaNet R50-FPN 2x from scratch, {_label}", _bbox)

# ---- BCN: the tables list AP / AP50 / AP75 / APl / APm / APs.
for _depth, _norm, _label, _bbox, _segm in (
    ("50", "gn_gn", "GN", "39.8/60.5/43.4/52.4/42.9/23.0", "36.1/57.4/38.7/53.6/38.6/16.9"),
    ("50", "gnws_gnws", "GN+WS", "40.8/61.6/44.8/52.7/44.0/23.5", "36.5/58.5/38.9/53.5/39.3/16.6"),
    ("50", "bcnws_bcnws", "BCN+WS", "41.4/62.2/45.2/54.7/45.0/24.2", "37.3/59.4/39.8/55.0/40.1/17.9"),
    ("101", "gn_gn", "GN", "41.5/62.0/45.5/54.8/45.0/24.1", "37.0/59.0/39.6/54.5/40.0/17.5"),
    ("101", "gnws_gnws", "GN+WS", "42.7/63.6/46.8/56.0/46.0/25.7", "37.9/60.4/40.7/56.3/40.6/18.2"),
    ("101", "bcnws_bcnws", "BCN+WS", "43.6/64.4/47.9/57.4/47.5/25.6", "39.1/61.4/42.2/57.3/42.1/19.1"),
):
    PAPER_RESULTS[f"bcn/mask_rcnn_R{_depth}_FPN_{_norm}_2x.yaml"] = _row(
        "BCN", "9", f"Mask R-CNN R{_depth}-FPN 2x, {_label} in backbone, FPN and both heads", _bbox, _segm,
        names=_BCN_ORDER)
for _norm, _label, _bbox in (
    ("gn_gn", "GN", "38.0/59.1/41.2/49.5/40.9/22.4"),
    ("gnws_gnws", "GN+WS", "38.9/60.4/42.1/50.4/42.4/23.5"),
    ("bcnws_bcnws", "BCN+WS", "39.7/60.9/43.1/51.7/43.2/24.0"),
):
    PAPER_RESULTS[f"bcn/faster_rcnn_R50_FPN_{_norm}_1x.yaml"] = _row(
        "BCN", "10", f"Faster R-CNN R50-FPN 1x, {_label} in backbone, FPN and box head", _bbox, names=_BCN_ORDER)
# R101 Faster R-CNN: the extracted table row is garbled; only AP50 and APm can be assigned to a column.
for _norm, _label, _ap50, _apm in (("gn_gn", "GN", 60.9, 43.3), ("gnws_gnws", "GN+WS", 62.8, 45.2),
                                    ("bcnws_bcnws", "BCN+WS", 63.4, 45.6)):
    PAPER_RESULTS[f"bcn/faster_rcnn_R101_FPN_{_norm}_1x.yaml"] = {
        "paper": "BCN", "table": "10", "row": f"Faster R-CNN R101-FPN 1x, {_label} in backbone, FPN and box head",
        "bbox": {"AP50": _ap50, "APm": _apm},
        "note": "The extracted Table 10 row for R101 is garbled: only AP50 and APm are certain "
                "(the authors' README gives AP 41.3 for GN+WS).",
    }


def paper_result(config_name):
    """The reported row for a config name (a path under configs/, or a file name that is unique among
    the configs), or None."""
    name = config_name.replace("\\", "/")
    if "configs/" in name:
        name = name.split("configs/", 1)[1]
    if name in PAPER_RESULTS:
        return PAPER_RESULTS[name]
    if "/" not in name:  # a bare file name: accepted where it names one config only
        matches = [key for key in PAPER_RESULTS if key.rsplit("/", 1)[-1] == name]
        if len(matches) == 1:
            return PAPER_RESULTS[matches[0]]
    return None
