#!/usr/bin/env python
"""Model-level speed and memory of the norms: the same as d2-smallbn-benchmark (d2_smallbn/bench/model.py)."""
import sys

from d2_smallbn.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
