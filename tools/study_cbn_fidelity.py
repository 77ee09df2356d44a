#!/usr/bin/env python
"""CBN's fidelity study: python -m d2_smallbn.bench.study_cbn_fidelity (d2_smallbn/bench/study_cbn_fidelity.py)."""
import sys

from d2_smallbn.bench.study_cbn_fidelity import main

if __name__ == "__main__":
    sys.exit(main())
