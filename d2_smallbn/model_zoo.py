"""A model-zoo API over this project's configs, mirroring ``detectron2.model_zoo``: YAML configs
(yacs) and LazyConfigs (``.py``); ``d2-smallbn-train --config-file NAME`` trains either.

The configs are package data (``d2_smallbn/configs``; the repository's ``configs/`` points
there), so names work after ``pip install .`` from any directory. This module depends only on
the configs (``d2_smallbn.config``), not on the engine.
"""
import os

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Detector weights trained with these configs and published by this project: none yet.
TRAINED_CHECKPOINTS = {}


def list_configs(kind=".yaml"):
    """Every config name (relative to configs/) ending in ``kind`` (".yaml" or ".py"), base configs
    and shared LazyConfig pieces (``lazy/common/``) excluded."""
    names = []
    for folder, _, files in os.walk(CONFIG_ROOT):
        for f in files:
            name = os.path.relpath(os.path.join(folder, f), CONFIG_ROOT).replace(os.sep, "/")
            if f.endswith(kind) and not f.startswith(("Base-", "_")) and not name.startswith("lazy/common/"):
                names.append(name)
    return sorted(names)


def _name(name):
    return name[len("configs/"):] if name.startswith("configs/") else name


def get_config_file(name):
    """Path of config ``name``, e.g. "mask_rcnn_R50_FPN_cbn.yaml" or "lazy/mask_rcnn_R50_FPN_4conv1fc_cbn.py"."""
    name = _name(name)
    path = os.path.join(CONFIG_ROOT, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name!r} is neither a file nor a d2_smallbn config. Available: "
                                f"{', '.join(list_configs('.yaml') + list_configs('.py'))}")
    return path


def get_config(name, trained=False):
    """The config of ``name``: for a ``.yaml``, the full yacs config (with MODEL.SMALLBN); for a
    ``.py``, the LazyConfig (an OmegaConf DictConfig, as ``detectron2.config.LazyConfig.load``)."""
    path = get_config_file(name)
    if name.endswith(".py"):
        from detectron2.config import LazyConfig

        cfg = LazyConfig.load(path)
        if trained:
            cfg.train.init_checkpoint = _trained_checkpoint(name)
        return cfg
    from .config import load_yaml_config

    cfg = load_yaml_config(path)
    if trained:
        cfg.MODEL.WEIGHTS = _trained_checkpoint(name)
    return cfg


def get(name, trained=False, device=None):
    """A detector built from config ``name`` (converted once); with ``trained``, its published weights.
    On ``device``, by default the config's (MODEL.DEVICE, train.device), or the CPU when that asks
    for CUDA on a machine without it, as ``detectron2.model_zoo.get``."""
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = get_config(name, trained=trained)
    if name.endswith(".py"):
        from detectron2.config import instantiate

        from .config import available_device

        model = instantiate(cfg.model)  # the config's model node converts it
        model.to(device or available_device(cfg.train.get("device", "cpu"), "train.device"))
        weights = cfg.train.init_checkpoint
    else:
        from detectron2.modeling import build_model  # d2_smallbn's patch: converts once

        if device is not None:
            cfg.MODEL.DEVICE = device
        model = build_model(cfg)
        weights = cfg.MODEL.WEIGHTS
    if trained:
        DetectionCheckpointer(model).load(weights)
    return model


def detectron2_config(name):
    """One of detectron2's own LazyConfigs by name, e.g. "common/models/mask_rcnn_fpn.py", loaded from
    the installed detectron2 package by path (no ``pkg_resources``); this project's ``.py`` configs
    are written on top of them."""
    import detectron2
    from detectron2.config import LazyConfig

    path = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detectron2's LazyConfig {name!r} is not in this detectron2 installation ({path})")
    return LazyConfig.load(path)


def _trained_checkpoint(name):
    name = _name(name)
    if name not in TRAINED_CHECKPOINTS:
        raise ValueError(f"No trained checkpoint is published for {name!r}. Train it with "
                         f"`d2-smallbn-train --config-file {name}` and load the result with "
                         "DetectionCheckpointer, or use trained=False for a randomly initialized model.")
    return TRAINED_CHECKPOINTS[name]
