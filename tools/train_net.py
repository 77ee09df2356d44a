#!/usr/bin/env python
"""Train, resume or evaluate with detectron2's launcher (YAML or LazyConfig .py): the same as the
installed command d2-smallbn-train. Its help and logic: d2_smallbn/train_net.py."""
import sys

from d2_smallbn.train_net import main

if __name__ == "__main__":
    sys.exit(main())
