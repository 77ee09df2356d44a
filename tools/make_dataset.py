#!/usr/bin/env python
"""Generate (or reuse) the built-in dataset: the same as d2-smallbn-dataset (d2_smallbn/data/cli.py)."""
import sys

from d2_smallbn.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
