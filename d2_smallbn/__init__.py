"""d2_smallbn: Cross-Iteration BN, Moving Average BN, Batch-Channel Norm + WS and Batch
Renormalization for detectron2.

``d2_smallbn.layers`` and ``d2_smallbn.norms`` (the table of norms) are pure PyTorch. Importing
``d2_smallbn`` with detectron2 installed teaches detectron2's ``get_norm`` the table's names and
makes ``build_model`` convert the models it builds (idempotent; what exactly is changed is
documented in ``d2_smallbn.modeling.patch``). ``convert_model(model, settings=None)`` is the one
conversion call, for models built any other way (a LazyConfig's ``instantiate``).
``register_norm(NormSpec(...))`` adds a user's own norm to the table (docs/usage.md, "Adding a norm").
``convert_batchnorm(model, "CBN", **layer_kwargs)`` (pure PyTorch, no detectron2 needed) turns any
PyTorch model's BatchNorm2d layers into CBN, MABN, BCN or BRN. Importing ``d2_smallbn`` also
registers the built-in dataset's names ``smallbn_shapes_train`` / ``smallbn_shapes_val`` (at
``d2_smallbn.data.default_root()``; no file is read or written until a split is loaded), as
importing detectron2 registers its own datasets.
"""
__version__ = "0.1.0"

from .batchnorm_conversion import convert_batchnorm  # noqa: E402  (pure PyTorch)
from .norms import NormSpec, register_norm, unregister_norm  # noqa: E402  (pure PyTorch)

__all__ = ["NormSpec", "convert_batchnorm", "register_norm", "unregister_norm"]

try:
    import detectron2  # noqa: F401
except ImportError:  # the layers work without detectron2
    pass
else:
    from .config import add_smallbn_config, check_smallbn_config
    from .data import register_shapes as _register_shapes
    from .modeling import convert_model
    from .modeling import install as _install

    _install()
    _register_shapes()
    __all__ += ["add_smallbn_config", "check_smallbn_config", "convert_model"]
