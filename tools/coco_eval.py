#!/usr/bin/env python
"""COCO box/mask AP of a results file, in the papers' layout, beside the paper's row for a config.

    python tools/coco_eval.py RESULTS.json ANNOTATIONS.json [--tasks bbox segm]
        [--config mask_rcnn_R50_FPN_cbn.yaml] [--output SUMMARY.json] [--verbose]

RESULTS is a COCO results file (a JSON list of {image_id, category_id, score, bbox} and/or
{..., segmentation: RLE}, e.g. detectron2's coco_instances_results.json); ANNOTATIONS the COCO
annotation file of the evaluated images. Tasks default to what every detection has. Prints AP,
AP50, AP75, APs, APm, APl (x100) per task, with --config also the paper's reported row and the
difference, and writes a JSON summary (default: RESULTS with the extension .eval.json).
A malformed or mismatched file gives a one-line error (file, problem, fix) and exit code 2; an empty
results list is evaluated as detectron2 does (every AP nan, with a warning).
The logic is in d2_smallbn/evaluation.py.
"""
import sys

if __name__ == "__main__":
    from d2_smallbn.evaluation import main

    sys.exit(main())
