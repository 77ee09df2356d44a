#!/usr/bin/env python
"""COCO box/mask AP of a results file beside the paper's row: the same as d2-smallbn-eval
(d2_smallbn/evaluation.py)."""
import sys

from d2_smallbn.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
