#!/usr/bin/env python
"""Convert a torchvision-style ResNet checkpoint for d2_smallbn's norms: the same as
d2-smallbn-convert-weights (d2_smallbn/weights/)."""
import sys

from d2_smallbn.weights.cli import main

if __name__ == "__main__":
    sys.exit(main())
