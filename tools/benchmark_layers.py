#!/usr/bin/env python
"""Layer-level speed of the norms: the same as d2-smallbn-benchmark-layers (d2_smallbn/bench/layers.py)."""
import sys

from d2_smallbn.bench.layers import main

if __name__ == "__main__":
    sys.exit(main())
