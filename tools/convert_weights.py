#!/usr/bin/env python
"""Convert a torchvision-style ResNet checkpoint into detectron2 weights for d2_smallbn's norms.

    python tools/convert_weights.py INPUT.pth OUTPUT.pkl [--target-norm TARGET] [--num-groups 32]
        [--keep-classifier] [--report REPORT.json] [--strict] [--trust-pickle]

INPUT: a torch checkpoint of a torchvision-layout ResNet (conv1, bn1, layer1-4, fc), optionally
DataParallel-wrapped ("module."), with BN, GN (GN+WS), BCN (inner bn + group affine) or
weight-centralized convs. OUTPUT: {"model": {name: ndarray}, "__author__": ..., "matching_heuristics":
True} with detectron2 names (stem.conv1, res2..res5, shortcut, .norm), for MODEL.WEIGHTS.
TARGET: auto, bn, frozenbn, syncbn, gn, or a norm of the table d2_smallbn.norms in lower case
(cbn, mabn, bcn, brn; --help lists them). --target-norm mabn writes norm.running_sqmean = running_var + running_mean^2. Every key that could
not be mapped is printed and listed in the JSON report (default: OUTPUT with .report.json);
--strict then exits with 1. An unusable input gives a one-line error and exit code 2.
The logic is in d2_smallbn/convert.py.
"""
import sys

if __name__ == "__main__":
    from d2_smallbn.convert import main

    sys.exit(main())
