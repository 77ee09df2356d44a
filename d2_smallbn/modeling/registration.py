"""What ``import d2_smallbn`` installs into detectron2 (idempotent):

- ``get_norm`` understands "CBN", "MABN" and "BCN", and names the valid norms on a typo;
- ``build_model`` builds with the config's SMALLBN hyper-parameters and runs the conversion pass;
- ``create_ddp_model`` no longer passes ``device_ids`` for CPU models (gloo), which torch rejects.

detectron2 modules import these functions by name, so every loaded detectron2 module that holds
the original gets the replacement; modules imported later get it from ``detectron2.layers``.
"""
import sys

from ..config import SMALLBN_NORMS, add_smallbn_config, check_smallbn_config
from .norms import build_norm, building, convert_model

STOCK_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


def _replace_everywhere(original, replacement):
    """Every loaded module's global bound to ``original`` (detectron2's own, and a user script's
    ``from detectron2.modeling import build_model`` made before ``import d2_smallbn``)."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if value is original:
                setattr(module, attr, replacement)


def _refuse_unconverted(module, args):
    raise RuntimeError(
        f"This {type(module).__name__} was created by name but the conv before it was never converted "
        "(it would run without its conv: no CBN window, no weight centring, no WS). Build models with "
        "detectron2.modeling.build_model after `import d2_smallbn`, or call "
        "d2_smallbn.modeling.convert_model(model, cfg).")


def _wrap_get_norm(original):
    def get_norm(norm, out_channels):
        if isinstance(norm, str) and norm in SMALLBN_NORMS:
            module = build_norm(norm, out_channels)
            module._unconverted = module.register_forward_pre_hook(_refuse_unconverted)  # removed by conversion
            return module
        try:
            return original(norm, out_channels)
        except KeyError:
            raise ValueError(f"Unknown norm {norm!r}. Valid names: {', '.join(STOCK_NORMS + SMALLBN_NORMS)}, "
                             "or '' for no norm.") from None

    return get_norm


def _wrap_build_model(original):
    def build_model(cfg):
        if "SMALLBN" not in cfg.MODEL:  # a plain detectron2 config: our defaults
            frozen, cfg = cfg.is_frozen(), cfg.clone()
            cfg.defrost()
            add_smallbn_config(cfg)
            if frozen:
                cfg.freeze()
        check_smallbn_config(cfg)
        with building(cfg):
            model = original(cfg)
        return convert_model(model, cfg)

    return build_model


def _wrap_create_ddp_model(original):
    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        first = next(model.parameters(), None)
        if "device_ids" not in kwargs and first is not None and first.device.type == "cpu":
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    return create_ddp_model


def install():
    import detectron2.engine.defaults
    import detectron2.layers.batch_norm as batch_norm
    import detectron2.modeling  # noqa: F401  (loads every module that imports the functions)
    import detectron2.modeling.meta_arch.build as build

    for module, attr, wrap in ((batch_norm, "get_norm", _wrap_get_norm),
                               (build, "build_model", _wrap_build_model),
                               (detectron2.engine.defaults, "create_ddp_model", _wrap_create_ddp_model)):
        current = getattr(module, attr)
        if getattr(current, "_smallbn_original", None) is None:
            replacement = wrap(current)
            replacement._smallbn_original = current
            replacement.__name__ = attr
            replacement.__doc__ = (current.__doc__ or "") + "\n(d2_smallbn: see d2_smallbn.modeling.registration)"
            _replace_everywhere(current, replacement)
