"""The model benchmark's settings: which norm goes where, and which settings each is compared with.

``SETTINGS`` are the settings measured by default. Any other norm of the table of norms (a norm
registered with ``d2_smallbn.register_norm`` included) is a setting by its name: that norm everywhere
(backbone, FPN and heads), compared with BN everywhere.
"""
from typing import NamedTuple, Tuple

from ..norms import NORMS


class ModelSetting(NamedTuple):
    backbone: str  # MODEL.RESNETS.NORM
    fpn_and_heads: str  # MODEL.FPN.NORM, ROI_BOX_HEAD.NORM and ROI_MASK_HEAD.NORM ("": none)
    conv: str  # MODEL.SMALLBN.CONV
    reference: str  # the setting its ratios are taken to
    label: str
    also: Tuple[str, ...] = ()  # settings it is compared with besides the reference and FOLD_REF


SETTINGS = {
    "frozen_none": ModelSetting("FrozenBN", "", "auto", "frozen_bn", "FrozenBN backbone, no norm in FPN/heads"),
    "frozen_bn": ModelSetting("FrozenBN", "BN", "auto", "frozen_bn", "FrozenBN backbone, BN in FPN/heads"),
    "frozen_gn": ModelSetting("FrozenBN", "GN", "auto", "frozen_bn", "FrozenBN backbone, GN in FPN/heads"),
    "frozen_cbn": ModelSetting("FrozenBN", "CBN", "auto", "frozen_bn", "FrozenBN backbone, CBN in FPN/heads"),
    "bn": ModelSetting("BN", "BN", "auto", "bn", "BN everywhere"),
    "gn": ModelSetting("GN", "GN", "auto", "bn", "GN everywhere"),
    "gn_ws": ModelSetting("GN", "GN", "ws", "bn", "GN+WS everywhere"),
    "cbn": ModelSetting("CBN", "CBN", "auto", "bn", "CBN everywhere"),
    "mabn": ModelSetting("MABN", "MABN", "auto", "bn", "MABN everywhere"),
    "bcn_ws": ModelSetting("BCN", "BCN", "auto", "bn", "BCN+WS everywhere", also=("gn_ws",)),
}
FOLD_REF = "frozen_none"  # folded inference is also compared with this setting, folded and unfolded


def setting(key):
    """The setting ``key``: its row of ``SETTINGS``, or the norm of that name everywhere."""
    if key in SETTINGS:
        return SETTINGS[key]
    name = key.upper()
    if name not in NORMS:
        raise KeyError(f"no benchmark setting {key!r}")
    return ModelSetting(name, name, "auto", "bn", f"{name} everywhere")


def setting_key(text):
    """The key of the setting ``text`` names, or None: a key of ``SETTINGS``, or a norm's name in any
    case (the row that has that norm everywhere, else the name in lower case)."""
    key = text.strip().lower()
    if key in SETTINGS:
        return key
    name = key.upper()
    if name not in NORMS:
        return None
    return next((k for k, s in SETTINGS.items() if s.backbone == s.fpn_and_heads == name and s.conv == "auto"),
                key)


def choices():
    return f"{', '.join(SETTINGS)}, or a norm's name ({', '.join(NORMS)})"


def references(key):
    """The settings ``key`` is compared with."""
    s = setting(key)
    return [s.reference, FOLD_REF, *s.also]


def with_references(keys):
    """``keys`` plus every setting they are compared with, and those settings' references in turn
    (frozen_none, the fold reference, is itself compared with frozen_bn): the rows of ``SETTINGS`` in
    their order, then the other settings in the order given."""
    closed, todo = set(), list(keys)
    while todo:
        key = todo.pop()
        if key not in closed:
            closed.add(key)
            todo.extend(references(key))
    return [k for k in SETTINGS if k in closed] + [k for k in dict.fromkeys(keys) if k not in SETTINGS]


def norms_of(keys):
    """The names of the table's norms that the settings ``keys`` use, in the table's order."""
    used = {name for key in keys for name in (setting(key).backbone, setting(key).fpn_and_heads)}
    return [name for name in NORMS if name in used]
