"""A model-zoo API over this project's configs, mirroring ``detectron2.model_zoo``.

The configs are package data (``d2_smallbn/configs``; the repository's ``configs/`` points
there), so names work after ``pip install .`` from any directory.
"""
import os

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Detector weights trained with these configs and published by this project: none yet.
TRAINED_CHECKPOINTS = {}


def list_configs():
    """Every config name (relative to configs/), base configs excluded."""
    names = []
    for folder, _, files in os.walk(CONFIG_ROOT):
        for f in files:
            if f.endswith(".yaml") and not f.startswith("Base-"):
                names.append(os.path.relpath(os.path.join(folder, f), CONFIG_ROOT))
    return sorted(names)


def get_config_file(name):
    """Path of config ``name``, e.g. "mask_rcnn_R50_FPN_cbn.yaml" or "quickstart/mask_rcnn_R18_FPN_cbn.yaml"."""
    name = name[len("configs/"):] if name.startswith("configs/") else name
    path = os.path.join(CONFIG_ROOT, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name!r} is neither a file nor a d2_smallbn config. "
                                f"Available: {', '.join(list_configs())}")
    return path


def get_config(name, trained=False):
    """The full detectron2 config (with MODEL.SMALLBN) of ``name``."""
    from .engine.defaults import build_config

    cfg = build_config(get_config_file(name))
    if trained:
        cfg.MODEL.WEIGHTS = _trained_checkpoint(name)
    return cfg


def get(name, trained=False, device=None):
    """A detector built from config ``name``; with ``trained``, its published weights."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = get_config(name, trained=trained)
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    if trained:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def _trained_checkpoint(name):
    name = name[len("configs/"):] if name.startswith("configs/") else name
    if name not in TRAINED_CHECKPOINTS:
        raise ValueError(f"No trained checkpoint is published for {name!r}. Train it with "
                         f"`python tools/train_net.py --config-file {name}` and load the result with "
                         "DetectionCheckpointer, or use trained=False for a randomly initialized model.")
    return TRAINED_CHECKPOINTS[name]
