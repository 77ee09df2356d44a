#!/usr/bin/env python
"""MABN's premise study: python -m d2_smallbn.bench.study_mabn_premise (d2_smallbn/bench/study_mabn_premise.py)."""
import sys

from d2_smallbn.bench.study_mabn_premise import main

if __name__ == "__main__":
    sys.exit(main())
