#!/usr/bin/env python
"""Pretraining stage of the pretrained regime: python -m d2_smallbn.bench.pretrain (d2_smallbn/bench/pretrain.py)."""
import sys

from d2_smallbn.bench.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
