"""Everything ``import d2_smallbn`` changes in detectron2, in one place (idempotent).

Two functions, because the stock config keys need them and nothing else would do:

1. ``detectron2.layers.get_norm`` also understands the names of ``d2_smallbn.norms.NORMS``
   ("CBN", "MABN", "BCN", "BRN", and any added by ``d2_smallbn.register_norm``), so that
   ``MODEL.RESNETS.NORM: "CBN"`` and a LazyConfig's ``norm="CBN"`` work wherever detectron2 builds
   a norm. A name from the table gives a ``PendingNorm``; an unknown name raises ValueError listing
   the valid ones (detectron2 raises a bare KeyError). Every other argument behaves exactly as before.
2. ``detectron2.modeling.build_model(cfg)`` is detectron2's, followed by ``convert_model(model,
   cfg)``: the one conversion call, exactly once. It accepts every config type detectron2's
   accepts (yacs ``CfgNode``, an OmegaConf ``DictConfig`` such as ``OmegaConf.create(cfg.dump())``),
   with or without a ``MODEL.SMALLBN`` section (without: the defaults).

detectron2's modules import these functions by name, so the replacement is also written into
every loaded ``detectron2.*`` module that holds the original (modules imported later get it from
``detectron2.layers`` / ``detectron2.modeling``). Other modules are not touched: a script that
ran ``from detectron2.modeling import build_model`` before ``import d2_smallbn`` keeps the
original, and its model's pending norms raise an error naming ``d2_smallbn.convert_model``.

Not patched: ``create_ddp_model``'s CPU bug (``device_ids`` for a CPU model) is worked around
only inside this project's trainers (``d2_smallbn.engine.ddp``).
"""
import sys

from ..norms import NORMS, STOCK_NORMS
from .conversion import PendingNorm, convert_model


def _wrap_get_norm(original):
    def get_norm(norm, out_channels):
        if isinstance(norm, str) and norm in NORMS:
            return PendingNorm(norm, out_channels)
        try:
            return original(norm, out_channels)
        except KeyError:
            raise ValueError(f"Unknown norm {norm!r}. Valid names: {', '.join(STOCK_NORMS + tuple(NORMS))}, "
                             "or '' for no norm.") from None

    return get_norm


def _wrap_build_model(original):
    def build_model(cfg):
        return convert_model(original(cfg), cfg, expect_norms=False)  # a stock model has nothing to convert

    return build_model


def _replace_in_detectron2(original, replacement):
    for name, module in list(sys.modules.items()):
        if name == "detectron2" or name.startswith("detectron2."):
            for attr, value in list(getattr(module, "__dict__", {}).items()):
                if value is original:
                    setattr(module, attr, replacement)


def install():
    import detectron2.layers.batch_norm as batch_norm
    import detectron2.modeling  # noqa: F401  (loads every module that imports the two functions)
    import detectron2.modeling.meta_arch.build as build

    for module, attr, wrap in ((batch_norm, "get_norm", _wrap_get_norm), (build, "build_model", _wrap_build_model)):
        current = getattr(module, attr)
        if getattr(current, "_smallbn_original", None) is None:
            replacement = wrap(current)
            replacement._smallbn_original = current
            replacement.__name__ = replacement.__qualname__ = attr
            replacement.__doc__ = (current.__doc__ or "") + "\n(d2_smallbn: see d2_smallbn.modeling.patch)"
            _replace_in_detectron2(current, replacement)
