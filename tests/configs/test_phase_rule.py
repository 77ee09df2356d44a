"""The one rule for a norm's own iteration counts (``d2_smallbn.norms``: ``phases``,
``scale_phases``, ``short_phases``), checked against the momentum of the running estimates it
protects, on its three paths: the per-GPU study's schedule, the quickstart's ``--iters`` and the
trainer hook's warning (the warning in log.txt: tests/tools/test_train_net.py)."""
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

import d2_smallbn  # noqa: F401  (registration)
from d2_smallbn.config import norm_names
from d2_smallbn.engine.defaults import build_config
from d2_smallbn.engine.hooks import check_phases
from d2_smallbn.layers import MovingAverageBatchNorm2d
from d2_smallbn.layers.brn import BatchRenorm2d
from d2_smallbn.model_zoo import get_config, list_configs
from d2_smallbn.norms import NORMS, Section, resolve, scale_phases, settling_iters, short_phases

MOMENTA = (0.9, 0.98, 0.99)


def least(name, key, section):
    """The minimum the rule sets for ``key`` of norm ``name`` (absolute, ramps included)."""
    phase = {p.key: p for p in NORMS[name].phases(section)}[key]
    return phase.minimum + (section[phase.after] if phase.after else 0)


def ema_left(make_layer, estimate, iters):
    """The largest fraction (over channels) of its initial distance to the data's value that a new
    layer's running ``estimate`` still has after ``iters`` training forwards of inputs whose
    statistics never change."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4) * 2 + 3
    layer = make_layer()
    start = getattr(layer, estimate).clone()
    for _ in range(iters):
        layer(x)
    target = {"running_mean": x.mean((0, 2, 3)), "running_sqmean": x.square().mean((0, 2, 3))}[estimate]
    return ((getattr(layer, estimate) - target).abs() / (start - target).abs()).max().item()


@pytest.mark.parametrize("momentum", MOMENTA)
def test_the_minimum_lets_each_layers_own_ema_forget_its_start(momentum):
    """At the rule's minimum the layer's EMA keeps at most exp(-3) of its start; at half of it, more."""
    brn = resolve({"BRN": {"MOMENTUM": momentum}}).BRN
    mabn = resolve({"MABN": {"MOMENTUM": momentum}}).MABN
    assert settling_iters(momentum) >= 3 / (1 - momentum) - 1e-9
    for make, estimate, iters in (
            (lambda: BatchRenorm2d(3, momentum=momentum, warmup_iters=10 ** 6), "running_mean",
             least("BRN", "WARMUP_ITERS", brn)),
            (lambda: MovingAverageBatchNorm2d(3, momentum=momentum, warmup_iters=10 ** 6, clip_warmup_iters=10 ** 6),
             "running_sqmean", least("MABN", "CLIP_WARMUP_ITERS", mabn))):
        assert ema_left(make, estimate, iters // 2) > math.exp(-3), estimate
        assert ema_left(make, estimate, iters) <= math.exp(-3) * (1 + 1e-4), estimate


def test_mabn_warmups_are_at_least_the_buffer_and_the_clipping_start_both():
    s = resolve({"MABN": {"MOMENTUM": 0.9, "BUFFER_SIZE": 64}}).MABN
    for key in ("WARMUP_ITERS", "FPN_WARMUP_ITERS", "HEADS_WARMUP_ITERS"):
        assert least("MABN", key, s) == 64
    assert least("MABN", "CLIP_WARMUP_ITERS", s) == 64  # the buffer (64) is longer than 3 / 0.1 = 30
    assert least("MABN", "CLIP_WARMUP_ITERS", resolve(None).MABN) == 150


def test_scaling_raises_only_what_falls_below_the_rule_and_keeps_ramp_lengths():
    brn = resolve({"BRN": {"MOMENTUM": 0.99}}).BRN  # 300 iterations to settle
    counts = {"WARMUP_ITERS": 5000, "D_MAX_ITERS": 25000, "R_MAX_ITERS": 40000}
    short = scale_phases("BRN", brn, counts, 0.01)
    assert {k: v for k, (v, _) in short.items()} == {"WARMUP_ITERS": 300, "D_MAX_ITERS": 500, "R_MAX_ITERS": 650}
    assert "raised to 300" in short["WARMUP_ITERS"][1] and "momentum 0.99" in short["WARMUP_ITERS"][1]
    long = scale_phases("BRN", brn, counts, 0.5)  # nothing below the rule: exactly proportional
    assert {k: v for k, (v, _) in long.items()} == {"WARMUP_ITERS": 2500, "D_MAX_ITERS": 12500, "R_MAX_ITERS": 20000}
    with pytest.raises(KeyError, match="MOMENTUM"):
        scale_phases("BRN", brn, {"MOMENTUM": 1}, 0.5)


@pytest.mark.parametrize("iters", [400, 1200, 180000])
def test_study_schedule_respects_the_rule_and_is_the_papers_at_full_length(iters):
    from d2_smallbn.bench.study_accuracy import per_gpu_schedule

    value = {k: r["value"] for k, r in per_gpu_schedule(4, 1, iters)[1].items()}
    s = resolve(None)
    for name in ("CBN", "MABN", "BRN"):
        for phase in NORMS[name].phases(s[name]):
            key = f"MODEL.SMALLBN.{name}.{phase.key}"
            if key in value:
                section = Section({**s[name], **{k.split(".")[-1]: v for k, v in value.items() if f".{name}." in k}})
                assert value[key] >= least(name, phase.key, section), key
    if iters == 180000:  # the papers' own counts
        assert [value[f"MODEL.SMALLBN.MABN.{k}"] for k in ("WARMUP_ITERS", "FPN_WARMUP_ITERS", "HEADS_WARMUP_ITERS",
                                                           "CLIP_WARMUP_ITERS")] == [100, 100, 10000, 1000]
        assert [value[f"MODEL.SMALLBN.BRN.{k}"] for k in ("WARMUP_ITERS", "D_MAX_ITERS", "R_MAX_ITERS")] == \
            [5000, 25000, 40000]
    if iters == 400:
        assert [value[f"MODEL.SMALLBN.MABN.{k}"] for k in ("WARMUP_ITERS", "FPN_WARMUP_ITERS", "HEADS_WARMUP_ITERS",
                                                           "CLIP_WARMUP_ITERS")] == [16, 16, 22, 150]
        assert [value[f"MODEL.SMALLBN.BRN.{k}"] for k in ("WARMUP_ITERS", "D_MAX_ITERS", "R_MAX_ITERS")] == \
            [150, 194, 228]
        assert value["MODEL.SMALLBN.CBN.BURNIN_ITERS"] == 100


@pytest.mark.parametrize("norm, iters, expected", [
    ("mabn", 100, {"WARMUP_ITERS": 20, "HEADS_WARMUP_ITERS": 20, "CLIP_WARMUP_ITERS": 150}),
    ("mabn", 1000, {"WARMUP_ITERS": 200, "HEADS_WARMUP_ITERS": 200, "CLIP_WARMUP_ITERS": 600}),
    ("brn", 100, {"WARMUP_ITERS": 150, "D_MAX_ITERS": 161, "R_MAX_ITERS": 169}),
    ("brn", 1000, {"WARMUP_ITERS": 300, "D_MAX_ITERS": 412, "R_MAX_ITERS": 494}),
    ("cbn", 1000, {"BURNIN_ITERS": 400}),
])
def test_quickstart_iters_scales_every_phase_by_the_rule(norm, iters, expected, tmp_path, caplog):
    from d2_smallbn.quickstart import build_cfg, parse_args

    with caplog.at_level(logging.INFO, logger="d2_smallbn.quickstart"):
        cfg = build_cfg(parse_args(["--norm", norm, "--iters", str(iters), "--output-dir", str(tmp_path)]), tmp_path)
    name = norm.upper()
    section = cfg.MODEL.SMALLBN[name]
    assert {k: section[k] for k in expected} == expected
    assert short_phases(resolve(cfg), [name]) == []
    for key, value in expected.items():  # the log says what each became and why
        assert f"--iters {iters}: MODEL.SMALLBN.{name}.{key} {value} (" in caplog.text


def _used(cfg):
    return sorted(norm_names(cfg) & set(NORMS))


@pytest.mark.parametrize("name", [n for n in list_configs() if n.endswith(".yaml")])
def test_no_repository_yaml_config_sets_a_phase_shorter_than_the_rule(name):
    cfg = build_config(name, [])
    assert short_phases(resolve(cfg), _used(cfg)) == []


@pytest.mark.parametrize("name", list_configs(".py"))
def test_no_repository_lazy_config_sets_a_phase_shorter_than_the_rule(name):
    cfg = get_config(name)
    assert "smallbn" in cfg
    assert short_phases(resolve(cfg), list(NORMS)) == []


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = MovingAverageBatchNorm2d(4), BatchRenorm2d(4)


@pytest.mark.parametrize("language, prefix", [
    ("yacs", "MODEL.SMALLBN"), ("lazy", "smallbn")])
def test_warning_names_the_key_the_momentum_and_the_minimum(language, prefix, caplog):
    values = {"MABN": {"CLIP_WARMUP_ITERS": 16, "MOMENTUM": 0.98}, "BRN": {"WARMUP_ITERS": 14, "MOMENTUM": 0.99}}
    settings = resolve(values if language == "yacs" else OmegaConf.create({"model": {}, "smallbn": values}))
    with caplog.at_level(logging.WARNING, logger="d2_smallbn"):
        short = check_phases(settings, _Model(), prefix)
    assert [(n, k, v, m) for n, k, v, m, _ in short] == [("BRN", "WARMUP_ITERS", 14, 300),
                                                         ("MABN", "CLIP_WARMUP_ITERS", 16, 150)]
    for key, momentum, minimum in (("MABN.CLIP_WARMUP_ITERS = 16", "0.98", 150), ("BRN.WARMUP_ITERS = 14", "0.99", 300)):
        line = next(r.getMessage() for r in caplog.records if f"{prefix}.{key}" in r.getMessage())
        assert f"momentum {momentum}" in line and f"at least {minimum}" in line, line
    caplog.clear()
    model = _Model()
    model.b.freeze()  # a frozen norm keeps no running estimate: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="d2_smallbn"):
        assert [k for _, k, *_ in check_phases(settings, model, prefix)] == ["CLIP_WARMUP_ITERS"]
