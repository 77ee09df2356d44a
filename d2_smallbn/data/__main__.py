"""``python -m d2_smallbn.data``: the same as ``d2-smallbn-dataset`` (``d2_smallbn.data.cli``)."""
from .cli import main

raise SystemExit(main())
