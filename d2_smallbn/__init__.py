"""d2_smallbn: Cross-Iteration BN, Moving Average BN and Batch-Channel Norm + WS for detectron2.

``d2_smallbn.layers`` is pure PyTorch. Importing ``d2_smallbn`` itself registers the norm names
"CBN", "MABN", "BCN" and the backbones with detectron2, and the built-in dataset's names
``smallbn_shapes_train`` / ``smallbn_shapes_val`` (at ``d2_smallbn.data.default_root()``; no file is
read or written until a split is loaded), as importing detectron2 registers its own datasets
(idempotent).
"""
__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError:  # the layers work without detectron2
    pass
else:
    from .config import add_smallbn_config, check_smallbn_config
    from .data import register_shapes as _register_shapes
    from .modeling import install as _install

    _install()
    _register_shapes()
    __all__ = ["add_smallbn_config", "check_smallbn_config"]
