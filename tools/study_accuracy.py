#!/usr/bin/env python
"""The accuracy study: python -m d2_smallbn.bench.study_accuracy (d2_smallbn/bench/study_accuracy.py)."""
import sys

from d2_smallbn.bench.study_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
