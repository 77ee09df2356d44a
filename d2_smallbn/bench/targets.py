"""The speed and memory targets of the benchmarks, in one table, judged one way.

``TARGETS[bench]`` ("model": ``d2_smallbn.bench.model``; "layers": ``.layers``) lists ``Target``s: a
ratio of one setting (the results' ``section``, the ``setting``, the ``ratio`` key) and the most it
may be on each device type. Model level: on CPU the CPU study's bounds; on CUDA the GPU targets (the
authors' code trains 1.23-1.30x slower than BN on GPUs; the CBN paper's Table 6 has 15.1 vs 14.1 GB
at 4 images per GPU). Layer level: the same bound on either device.
"""
from typing import Dict, NamedTuple


class Target(NamedTuple):
    name: str
    section: str  # of the results: "train", "infer_folded", "memory" (model); "train", "eval" (layers)
    setting: str
    ratio: str  # the ratio's key in the setting's entry
    bounds: Dict[str, float]  # device type -> the most the ratio may be
    description: str  # with {} for the bound

    def describe(self, bound):
        return self.description.format(f"{bound:.2f}")


def _on_any_device(bound):
    return {"cpu": bound, "cuda": bound}


TARGETS = {
    "model": (
        Target("cbn_fpn_heads_train", "train", "frozen_cbn", "ratio_vs_frozen_bn", {"cpu": 1.10, "cuda": 1.15},
               "CBN in FPN+heads: train step <= {}x FrozenBN backbone + BN in FPN/heads"),
        Target("cbn_train", "train", "cbn", "ratio_vs_bn", {"cuda": 1.25},
               "CBN everywhere: train step <= {}x BN everywhere"),
        Target("mabn_train", "train", "mabn", "ratio_vs_bn", {"cpu": 1.10, "cuda": 1.05},
               "MABN everywhere: train step <= {}x BN everywhere"),
        Target("bcn_ws_train", "train", "bcn_ws", "ratio_vs_gn_ws", {"cpu": 1.10, "cuda": 1.05},
               "BCN+WS: train step <= {}x GN+WS"),
        Target("frozen_cbn_folded_infer", "infer_folded", "frozen_cbn", "ratio_vs_frozen_none_folded",
               {"cpu": 1.03, "cuda": 1.02}, "folded CBN (FPN+heads) inference <= {}x FrozenBN model folded"),
        Target("cbn_folded_infer", "infer_folded", "cbn", "ratio_vs_frozen_none_folded", {"cpu": 1.03, "cuda": 1.02},
               "folded CBN (everywhere) inference <= {}x FrozenBN model folded"),
        Target("mabn_folded_infer", "infer_folded", "mabn", "ratio_vs_frozen_none_folded",
               {"cpu": 1.03, "cuda": 1.02}, "folded MABN inference <= {}x FrozenBN model folded"),
        Target("cbn_fpn_heads_memory", "memory", "frozen_cbn", "ratio_vs_frozen_bn", {"cpu": 1.05, "cuda": 1.07},
               "CBN in FPN+heads: peak memory <= {}x BN in FPN/heads"),
        Target("cbn_memory", "memory", "cbn", "ratio_vs_bn", {"cpu": 1.05, "cuda": 1.07},
               "CBN everywhere: peak memory <= {}x BN everywhere"),
    ),
    "layers": (
        Target("cbn_train", "train", "cbn", "ratio_vs_bn", _on_any_device(1.45), "train <= {}x conv+BN"),
        Target("mabn_train", "train", "mabn", "ratio_vs_bn", _on_any_device(1.15), "train <= {}x conv+BN"),
        Target("bcn_ws_train", "train", "bcn_ws", "ratio_vs_gn_ws", _on_any_device(1.15), "train <= {}x conv+GN+WS"),
        Target("cbn_folded_eval", "eval", "cbn_folded", "ratio_vs_frozen_bn", _on_any_device(1.03),
               "eval <= {}x conv+FrozenBN eval"),
        Target("mabn_folded_eval", "eval", "mabn_folded", "ratio_vs_frozen_bn", _on_any_device(1.03),
               "eval <= {}x conv+FrozenBN eval"),
    ),
}


def verdict(target, results, device_type):
    """How ``target`` fares in ``results`` ({section: {setting: entry}}) on ``device_type``: its bound, the
    measured ratio (the median of the per-round ratios, or the one number of a memory ratio), whether it
    is met, and whether that is conclusive (the interquartile range of the per-round ratios lies on one
    side of the bound). None where the target has no bound for the device; measured, met and conclusive
    are None where its setting was not measured."""
    bound = target.bounds.get(device_type)
    if bound is None:
        return None
    value = results.get(target.section, {}).get(target.setting, {}).get(target.ratio)
    if value is None:
        return {"bound": bound, "measured": None, "met": None, "conclusive": None}
    if not isinstance(value, dict):  # one number, not per-round ratios
        return {"bound": bound, "measured": value, "met": value <= bound, "conclusive": True}
    return {"bound": bound, "measured": value["median"], "met": value["median"] <= bound,
            "conclusive": value["p75"] <= bound or value["p25"] > bound}
