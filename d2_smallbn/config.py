"""``add_smallbn_config(cfg)``: the MODEL.SMALLBN section of a yacs config, generated from the
table of norms (``d2_smallbn.norms``: the shared keys, then one subsection per norm with its
defaults), and its validation."""
from detectron2.config import CfgNode as CN

from .norms import NORMS, conv_class_for, defaults, resolve

# The stock config keys that name a norm (what get_norm receives).
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM",
             "MODEL.RETINANET.NORM")


def add_smallbn_config(cfg):
    """Adds MODEL.SMALLBN (idempotent): the table's norms as it is now, so a config that already has
    the section gains the sections of norms registered since. Defaults are the papers' / released
    code's; see ``d2_smallbn.norms`` (and docs/configs.md) for what each key means."""
    if "SMALLBN" not in cfg.MODEL:
        cfg.MODEL.SMALLBN = CN(defaults())
    for name, values in defaults().items():
        if name not in cfg.MODEL.SMALLBN:
            cfg.MODEL.SMALLBN[name] = CN(values) if isinstance(values, dict) else values
    return cfg


def norm_names(cfg):
    """The norm names the config's norm keys use (RetinaNet's included)."""
    names = set()
    for key in NORM_KEYS:
        node = cfg
        for part in key.split("."):
            node = node[part] if part in node else ""
        names.add(node)
    return names


def check_smallbn_config(cfg):
    """Raises ValueError naming the key and the valid values for every invalid or unknown value."""
    s = resolve(cfg)
    for name in norm_names(cfg) & set(NORMS):
        try:
            conv_class_for(name, s.CONV)
        except ValueError as e:
            raise ValueError(f"MODEL.SMALLBN.CONV = {s.CONV!r} is invalid: {e}") from None
    return cfg


def load_yaml_config(path, opts=()):
    """detectron2's config with MODEL.SMALLBN, merged from the YAML file ``path`` and ``opts``,
    validated. A config asking for CUDA on a machine without it runs on CPU (logged once). A
    ``_BASE_`` naming no file raises FileNotFoundError saying which (``missing_base``)."""
    from detectron2.config import get_cfg

    cfg = add_smallbn_config(get_cfg())
    try:
        cfg.merge_from_file(path)
    except FileNotFoundError:
        problem = missing_base(path)
        if problem is None:
            raise
        raise FileNotFoundError(problem) from None
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    check_smallbn_config(cfg)
    return cfg


def available_device(device, key):
    """``device``, or "cpu" (logged once per process) when it asks for CUDA on a machine without it."""
    import logging

    import torch
    from detectron2.utils.logger import log_first_n

    if device.startswith("cuda") and not torch.cuda.is_available():
        # once per process: tools build many configs (study runs, benchmark settings)
        log_first_n(logging.WARNING, f"No CUDA device: running on CPU ({key} cpu)", name=__name__, key="caller")
        return "cpu"
    return device


def missing_base(path):
    """One line for the first ``_BASE_`` in the chain of YAML files from ``path`` that names no file
    (resolved as detectron2 resolves it: relative to the folder of the file naming it), or None.
    A model-zoo name there gets the zoo's path for it."""
    import os

    for base in _bases(path):
        resolved = _resolve_base(path, base)
        if resolved.startswith(("http://", "https://")):
            continue
        if not os.path.isfile(resolved):
            return _missing_base_message(path, base, resolved)
        problem = missing_base(resolved)
        if problem:
            return problem
    return None


def _bases(path):
    """The ``_BASE_`` entries of the YAML file ``path`` (none if it cannot be read)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return []
    bases = data.get("_BASE_") if isinstance(data, dict) else None
    return [bases] if isinstance(bases, str) else [b for b in bases or [] if isinstance(b, str)]


def _resolve_base(path, base):
    import os

    base = os.path.expanduser(base) if base.startswith("~") else base
    if base.startswith(("/", "https://", "http://")):
        return base
    return os.path.join(os.path.dirname(path), base)


def _missing_base_message(path, base, resolved):
    import os

    from .model_zoo import get_config_file

    where = f"{path}: _BASE_ {base!r} names no file ({os.path.normpath(resolved)} does not exist)"
    try:
        zoo_path = get_config_file(base)
    except FileNotFoundError:
        return (f"{where}; _BASE_ paths are absolute or relative to the folder of the file that names them. "
                "Fix: correct the path")
    return (f"{where}: _BASE_ takes a path, absolute or relative to the folder of the file that names it, and "
            f"{base!r} is the name of a d2_smallbn model-zoo config. Fix: write _BASE_: \"{zoo_path}\" "
            f"(d2_smallbn.model_zoo.get_config_file({base!r}))")
