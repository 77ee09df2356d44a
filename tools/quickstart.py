#!/usr/bin/env python
"""The main job on the built-in dataset: the same as d2-smallbn-quickstart (d2_smallbn/quickstart.py)."""
import sys

from d2_smallbn.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
