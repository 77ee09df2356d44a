"""What the papers reported for each config, so tools can show it beside a measured result.

``PAPER_RESULTS[config_name]`` (the config's path relative to configs/) holds the paper, table and
row, and per task ("bbox", "segm") the reported metrics under COCO's names (AP, AP50, AP75, APs,
APm, APl); a metric the paper did not report (or that the extracted text garbles) is absent.
Numbers come from the papers' tables (see docs/configs.md).
"""

PAPER_RESULTS = {
    "mask_rcnn_R50_FPN_cbn.yaml": {
        "paper": "CBN", "table": "5", "row": "Mask R-CNN R50-FPN, frozen-BN backbone, CBN in FPN and heads",
        "bbox": {"AP": 38.5, "AP50": 59.2, "AP75": 42.1},
        "segm": {"AP": 34.6, "AP50": 56.4, "AP75": 36.6},
    },
}


def paper_result(config_name):
    """The reported row for a config name (a path under configs/ or a bare file name), or None."""
    name = config_name.replace("\\\\", "/")
    if "configs/" in name:
        name = name.split("configs/", 1)[1]
    return PAPER_RESULTS.get(name)
