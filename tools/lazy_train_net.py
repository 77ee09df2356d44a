#!/usr/bin/env python
"""Train or evaluate a LazyConfig (.py): the same as d2-smallbn-train, which takes .yaml and .py configs
(d2_smallbn/train_net.py; the LazyConfig loop is d2_smallbn/engine/lazy.py)."""
import sys

from d2_smallbn.train_net import main

if __name__ == "__main__":
    sys.exit(main())
