#!/usr/bin/env python
"""Convert a torchvision-style ResNet checkpoint for d2_smallbn's norms: the same as d2-smallbn-convert
(d2_smallbn/convert.py)."""
import sys

from d2_smallbn.convert import main

if __name__ == "__main__":
    sys.exit(main())
