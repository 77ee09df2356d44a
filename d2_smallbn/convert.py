"""The former name of weight conversion, kept as an alias: ``d2-smallbn-convert`` and ``python -m
d2_smallbn.convert`` run ``d2-smallbn-convert-weights`` (``d2_smallbn.weights``), and its functions
import from here as before."""
from .weights import *  # noqa: F401,F403
from .weights import __all__  # noqa: F401
from .weights.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
