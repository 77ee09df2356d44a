#!/usr/bin/env python
"""Generate the built-in dataset, train a quickstart Mask R-CNN on it, COCO-evaluate it and write
the results (see d2_smallbn/quickstart.py). Example: python tools/quickstart.py --norm mabn --iters 500
"""
from d2_smallbn.quickstart import main

if __name__ == "__main__":
    main()
