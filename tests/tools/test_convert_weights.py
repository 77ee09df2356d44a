"""d2-smallbn-convert-weights (d2_smallbn.weights; the alias d2-smallbn-convert, d2_smallbn.convert) on
synthetic ResNet-18 checkpoints (nothing is downloaded): torchvision BN (plain, DataParallel 'module.',
wrapped in {"state_dict": ...}), GN+WS, BCN+WS with an inner bn and a group affine (per group, per
channel constant within groups, per channel varying, the authors' layout with the affine beside the
inner bn), MABN's own layout, and junk keys.

Checked: values are preserved exactly under the detectron2 names; the .pkl loads through
DetectionCheckpointer into a detectron2 R18 (build_resnet_backbone, NORM BN/FrozenBN, CBN, MABN,
BCN, GN with WS convs, and nested as bottom_up of an FPN) with no unexpected keys, no shape
mismatches and no missing backbone keys except the layer state that starts fresh, and every model
tensor equal to the converted value; MABN gets running_sqmean = running_var + running_mean^2;
BCN's group affine lands in group_weight/group_bias; an MABN checkpoint keeps its statistics and
starts its training state fresh; unmapped keys are reported (and --strict fails).
"""
import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import d2_smallbn  # noqa: F401  (registers the norm names)
from d2_smallbn import add_smallbn_config
from d2_smallbn.layers import MovingAverageBatchNorm2d
from d2_smallbn.weights import ConvertError, convert_file, convert_state_dict, is_expected_missing
from d2_smallbn.weights.cli import main as convert_main

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "d2_smallbn.weights"]
G = 32  # BCN groups (the default of --num-groups and MODEL.SMALLBN.BCN.NUM_GROUPS)


# ---- synthetic checkpoints ----------------------------------------------------------------------

class GroupAffine(nn.Module):
    """A per-group scale and shift (length G), as in BCN."""

    def __init__(self, groups):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups))
        self.bias = nn.Parameter(torch.zeros(groups))


class BCNLike(nn.Module):
    """A BCN norm as released checkpoints store it: an inner BatchNorm2d and a GroupNorm part."""

    def __init__(self, channels, group_part="per_group"):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.gn = GroupAffine(G) if group_part == "per_group" else nn.GroupNorm(G, channels)


class BCNAuthors(nn.Module):
    """The authors' layout: the group affine (shape (1, G, 1)) beside the inner BatchNorm2d."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, G, 1))
        self.bias = nn.Parameter(torch.zeros(1, G, 1))
        self.bn = nn.BatchNorm2d(channels)


def _randomize(sd, seed=0):
    """Distinct random values everywhere (running_var positive), so that equality means something."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            r = torch.rand(v.shape, generator=gen)
            out[k] = r + 0.5 if k.endswith(("running_var", "running_sqmean")) else r * 2 - 1
        else:
            out[k] = torch.full_like(v, 7)
    return out


def resnet18_state(norm="bn", seed=0):
    """A fresh dict (shared, never modified tensors) of a randomized torchvision ResNet-18 state."""
    return dict(_resnet18_state(norm, seed))


@functools.lru_cache(maxsize=None)
def _resnet18_state(norm, seed):
    layers = {
        "bn": None,
        "gn": lambda c: nn.GroupNorm(G, c),
        "bcn": lambda c: BCNLike(c),
        "bcn_per_channel": lambda c: BCNLike(c, "per_channel"),
        "bcn_authors": BCNAuthors,
        "mabn": MovingAverageBatchNorm2d,  # d2_smallbn's own layer: its state is MABN's layout
    }
    sd = _randomize(torchvision.models.resnet18(weights=None, norm_layer=layers[norm]).state_dict(), seed)
    if norm == "bcn_per_channel":  # GroupNorm affine of length C, constant within each group
        for k in [k for k in sd if k.endswith("gn.weight") or k.endswith("gn.bias")]:
            per = sd[k].numel() // G
            sd[k] = torch.rand(G, generator=torch.Generator().manual_seed(len(k))).repeat_interleave(per)
    return sd


def d2_name(key):
    """The expected detectron2 name of a torchvision ResNet key (independent of the converter)."""
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "stem.conv1." + ("" if parts[0] == "conv1" else "norm.") + ".".join(parts[1:])
    base = f"res{int(parts[0][len('layer'):]) + 1}.{parts[1]}"
    if parts[2] == "downsample":
        return f"{base}.shortcut." + ("" if parts[3] == "0" else "norm.") + ".".join(parts[4:])
    kind, j = parts[2][:-1], parts[2][-1]
    return f"{base}.conv{j}." + ("" if kind == "conv" else "norm.") + ".".join(parts[3:])


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def _load_pkl(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


# ---- detectron2 side ----------------------------------------------------------------------------

def build_r18(norm, conv="auto", freeze_at=0, fpn=False):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from d2_smallbn.modeling import convert_model

    cfg = add_smallbn_config(get_cfg())
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # the default ["res4"] builds no res5
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.SMALLBN.CONV = conv
    cfg.MODEL.SMALLBN.BCN.NUM_GROUPS = G
    builder = build_resnet_fpn_backbone if fpn else build_resnet_backbone
    return convert_model(builder(cfg, ShapeSpec(channels=3)), cfg)


def load_into(model, path):
    """Loads through DetectionCheckpointer; returns its incompatible keys (missing, unexpected, shapes)."""
    from detectron2.checkpoint import DetectionCheckpointer

    ckpt = DetectionCheckpointer(model)
    seen = {}
    original = ckpt._load_model

    def spy(checkpoint):
        seen["incompatible"] = original(checkpoint)
        return seen["incompatible"]

    ckpt._load_model = spy
    ckpt.load(str(path))
    return seen["incompatible"]


def assert_loaded(model, pkl, report, prefix=""):
    inc = load_into(model, pkl)
    assert inc.unexpected_keys == [] and inc.incorrect_shapes == [], (inc.unexpected_keys, inc.incorrect_shapes)
    missing = [k for k in inc.missing_keys if not k.startswith("fpn_")]
    assert all(is_expected_missing(k, report["expected_missing_on_load"]) for k in missing), missing
    state = model.state_dict()
    converted = _load_pkl(pkl)["model"]
    for key, value in converted.items():
        assert torch.equal(state[prefix + key], torch.from_numpy(value)), key
    # every backbone tensor came from the checkpoint, except the expected fresh state
    for key in state:
        if not key.startswith("fpn_") and key[len(prefix):] not in converted:
            assert is_expected_missing(key, report["expected_missing_on_load"]) or _fresh_state(key), key
    return inc


def _fresh_state(key):
    """Layer state that the layer itself treats as fresh when it loads BN statistics."""
    return key.rsplit(".", 1)[-1] in {"num_steps", "num_stored", "hist_mean", "hist_sqmean", "hist_mean_proj",
                                      "hist_sqmean_proj", "hist_dmean", "hist_dsqmean", "update_rate",
                                      "group_weight", "group_bias"}


# ---- tests: names and values --------------------------------------------------------------------

def test_bn_names_and_values_exact():
    sd = resnet18_state("bn")
    report = convert_state_dict({"module." + k: v for k, v in sd.items()})
    model = report["model"]
    assert report["module_prefix_stripped"] == len(sd)
    assert report["unmapped"] == []
    assert {d["key"] for d in report["dropped"]} == {"fc.weight", "fc.bias"}
    expected = {d2_name(k): v for k, v in sd.items() if not k.startswith("fc.")}
    assert set(model) == set(expected)
    for k, v in expected.items():
        assert torch.equal(model[k], v), k
    # spot checks of the naming scheme itself
    assert torch.equal(model["res2.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    assert torch.equal(model["stem.conv1.norm.running_var"], sd["bn1.running_var"])
    assert torch.equal(model["res3.0.shortcut.weight"], sd["layer2.0.downsample.0.weight"])
    assert torch.equal(model["res5.1.conv2.norm.bias"], sd["layer4.1.bn2.bias"])


def test_bottleneck_r50_names_load_and_config_hints(tmp_path):
    sd = _randomize(torchvision.models.resnet50(weights=None).state_dict())
    src = _save(tmp_path / "r50.pth", sd)
    out = str(tmp_path / "r50.pkl")
    report = convert_file(src, out, target_norm="frozenbn")
    assert report["unmapped"] == []
    model = _load_pkl(out)["model"]
    for key in ("layer1.0.conv3.weight", "layer1.0.bn3.running_var", "layer4.2.bn2.weight",
                "layer3.5.conv1.weight", "layer2.0.downsample.1.running_mean"):
        assert np.array_equal(model[d2_name(key)], sd[key].numpy()), key
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == 53 and not any(k.endswith("num_batches_tracked") for k in model)  # NORM FrozenBN has none
    assert len(model) == len(sd) - 2 - len(counters)  # everything else but fc
    hints = report["config_hints"]
    assert hints["MODEL.RESNETS.DEPTH"] == 50 and hints["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert hints["MODEL.RESNETS.NORM"] == "FrozenBN" and hints["INPUT.FORMAT"] == "RGB"

    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = add_smallbn_config(get_cfg())
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    for key, value in hints.items():
        cfg.merge_from_list([key, value])
    inc = assert_loaded(build_resnet_backbone(cfg, ShapeSpec(channels=3)), out, report)
    assert inc.missing_keys == []


def test_r18_config_hints():
    hints = convert_state_dict(resnet18_state("bcn"))["config_hints"]
    assert hints["MODEL.RESNETS.DEPTH"] == 18 and hints["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert hints["MODEL.RESNETS.NORM"] == "BCN" and hints["MODEL.SMALLBN.BCN.NUM_GROUPS"] == G
    assert "MODEL.RESNETS.STRIDE_IN_1X1" not in hints


def test_mabn_running_sqmean():
    sd = resnet18_state("bn")
    model = convert_state_dict(sd, target_norm="mabn")["model"]
    norms = [k[: -len(".running_var")] for k in sd if k.endswith(".running_var")]
    assert len(norms) == 20
    for src in norms:
        dst = d2_name(src + ".running_var")[: -len(".running_var")]
        mean, var = sd[src + ".running_mean"].double(), sd[src + ".running_var"].double()
        assert torch.allclose(model[dst + ".running_sqmean"].double(), var + mean ** 2, rtol=1e-7, atol=0)
        assert not any(dst + "." + leaf in model for leaf in ("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(model[dst + ".weight"], sd[src + ".weight"])


@pytest.mark.parametrize("layout", ["bcn", "bcn_per_channel", "bcn_authors"])
def test_bcn_group_affine(layout):
    sd = resnet18_state(layout)
    report = convert_state_dict(sd)
    model = report["model"]
    assert report["unmapped"] == [] and report["source_norm_layouts"] == {"BCN": 20}
    for key in [k for k in sd if k.endswith("bn.running_mean")]:
        src = key[: -len(".bn.running_mean")]
        dst = d2_name(src + ".weight")[: -len(".weight")]
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(model[f"{dst}.{leaf}"], sd[f"{src}.bn.{leaf}"]), (dst, leaf)
        affine = {"bcn": "gn.", "bcn_per_channel": "gn.", "bcn_authors": ""}[layout]
        for leaf in ("weight", "bias"):
            value = sd[f"{src}.{affine}{leaf}"].reshape(-1)
            if layout == "bcn_per_channel":
                value = value[:: value.numel() // G]
            assert model[f"{dst}.group_{leaf}"].shape == (G,)
            assert torch.equal(model[f"{dst}.group_{leaf}"], value), (dst, leaf)


def test_gn_ws_maps_one_to_one():
    sd = resnet18_state("gn")
    report = convert_state_dict(sd)
    assert report["unmapped"] == [] and report["source_norm_layouts"] == {"GN": 20}
    expected = {d2_name(k): v for k, v in sd.items() if not k.startswith("fc.")}
    assert set(report["model"]) == set(expected)
    assert all(torch.equal(report["model"][k], v) for k, v in expected.items())


def test_unmapped_keys_are_reported():
    sd = resnet18_state("bcn_per_channel")
    sd["layer1.0.bn1.gn.weight"] = torch.arange(64.0)  # varies within groups: no exact per-group value
    sd["junk.weight"] = torch.zeros(3)
    sd["layer2.0.extra"] = torch.zeros(3)
    sd["layer3.1.bn2.bn.estimated_mean"] = torch.zeros(256)
    report = convert_state_dict(sd)
    unmapped = {u["key"]: u["reason"] for u in report["unmapped"]}
    assert set(unmapped) == {"layer1.0.bn1.gn.weight", "layer1.0.bn1.gn.bias", "junk.weight", "layer2.0.extra",
                             "layer3.1.bn2.bn.estimated_mean"}
    assert "varies within groups" in unmapped["layer1.0.bn1.gn.weight"]
    assert "res2.0.conv1.norm.group_weight" not in report["model"]
    assert "res2.0.conv1.norm.running_var" in report["model"]  # the rest of that norm is kept


MABN_TRAINING_STATE = ("num_steps", "sqmean_buffer", "psi_buffer")


def test_mabn_own_layout_keeps_its_statistics_and_starts_its_training_state_fresh():
    sd = resnet18_state("mabn")
    report = convert_state_dict(sd)
    model = report["model"]
    assert report["source_norm_layouts"] == {"MABN": 20} and report["targets_used"] == {"mabn": 20}
    assert report["unmapped"] == [] and report["config_hints"]["MODEL.RESNETS.NORM"] == "MABN"
    norms = [k[: -len(".running_sqmean")] for k in sd if k.endswith(".running_sqmean")]
    assert len(norms) == 20
    assert {d["key"] for d in report["dropped"]} == {f"{n}.{leaf}" for n in norms for leaf in MABN_TRAINING_STATE} \
        | {"fc.weight", "fc.bias"}
    for src in norms:
        dst = d2_name(src + ".weight")[: -len(".weight")]
        assert {k[len(dst) + 1:] for k in model if k.startswith(dst + ".")} == {"weight", "bias", "running_sqmean"}
        for leaf in ("weight", "bias", "running_sqmean"):
            assert torch.equal(model[f"{dst}.{leaf}"], sd[f"{src}.{leaf}"]), (dst, leaf)


def test_mabn_own_layout_loads_into_detectron2_r18(tmp_path):
    sd = resnet18_state("mabn")
    src, out = _save(tmp_path / "in.pth", sd), str(tmp_path / "out.pkl")
    report = convert_file(src, out)
    model = build_r18("MABN")
    inc = assert_loaded(model, out, report)
    assert sorted({k.rsplit(".", 1)[-1] for k in inc.missing_keys}) == sorted(MABN_TRAINING_STATE)
    assert torch.equal(model.res3[1].conv2.norm.running_sqmean, sd["layer2.1.bn2.running_sqmean"])
    assert int(model.res3[1].conv2.norm.num_steps) == 0 and sd["layer2.1.bn2.num_steps"] == 7  # fresh


@pytest.mark.parametrize("src,target,reason", [
    ("bn", "gn", "cannot become a GroupNorm"),
    ("gn", "bn", "no batch statistics"),
    ("bcn", "bn", "group part of BCN has no counterpart"),
    ("bcn", "gn", "a BCN norm cannot become a GroupNorm"),
    ("mabn", "cbn", "cannot become CBN"),
    ("mabn", "gn", "cannot become GN"),
])
def test_impossible_targets_are_reported(src, target, reason):
    report = convert_state_dict(resnet18_state(src), target_norm=target)
    assert report["unmapped"] and all(reason in u["reason"] for u in report["unmapped"])


# ---- tests: loading into detectron2 -------------------------------------------------------------

LOAD_CASES = {
    # name: (checkpoint layout, how it is saved, --target-norm, d2 NORM, SMALLBN.CONV, FREEZE_AT)
    "bn_frozen_stages": ("bn", "plain", "auto", "BN", "auto", 2),
    "bn_dataparallel_to_cbn": ("bn", "dataparallel", "cbn", "CBN", "auto", 0),
    "bn_to_mabn": ("bn", "plain", "mabn", "MABN", "auto", 0),
    "bn_to_bcn": ("bn", "plain", "bcn", "BCN", "auto", 0),
    "gn_ws": ("gn", "dataparallel", "auto", "GN", "ws", 0),
    "bcn_ws": ("bcn", "plain", "auto", "BCN", "auto", 0),
    "bcn_ws_per_channel": ("bcn_per_channel", "plain", "bcn", "BCN", "auto", 0),
    "bcn_ws_authors": ("bcn_authors", "dataparallel", "auto", "BCN", "auto", 0),
}


def _checkpoint_file(tmp_path, layout, saved):
    sd = resnet18_state(layout)
    if saved == "dataparallel":
        return _save(tmp_path / "in.pth", {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 5}), sd
    return _save(tmp_path / "in.pth", sd), sd


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_loads_into_detectron2_r18(tmp_path, case):
    layout, saved, target, norm, conv, freeze_at = LOAD_CASES[case]
    src, sd = _checkpoint_file(tmp_path, layout, saved)
    out = str(tmp_path / "out.pkl")
    report = convert_file(src, out, target_norm=target)
    assert report["unmapped"] == []
    data = _load_pkl(out)
    assert data["__author__"] == "d2_smallbn convert_weights" and data["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    model = build_r18(norm, conv, freeze_at)
    inc = assert_loaded(model, out, report)
    if target == "mabn":
        assert sorted({k.rsplit(".", 1)[-1] for k in inc.missing_keys}) == ["num_steps", "psi_buffer", "sqmean_buffer"]
        mean, var = sd["layer1.0.bn1.running_mean"], sd["layer1.0.bn1.running_var"]
        assert torch.allclose(model.res2[0].conv1.norm.running_sqmean, var + mean ** 2, rtol=1e-6, atol=0)
    elif layout.startswith("bcn"):
        assert sorted({k.rsplit(".", 1)[-1] for k in inc.missing_keys}) == ["update_rate"]
        group = model.res3[1].conv2.norm.group_weight
        assert group.shape == (G,) and not torch.equal(group, torch.ones(G))
    else:
        assert inc.missing_keys == []
    if case == "bn_frozen_stages":
        from detectron2.layers import FrozenBatchNorm2d

        assert isinstance(model.stem.conv1.norm, FrozenBatchNorm2d)
        assert isinstance(model.res3[0].conv1.norm, nn.BatchNorm2d)
    if case == "bn_to_bcn":  # the group part starts as identity
        assert torch.equal(model.res2[0].conv1.norm.group_weight, torch.ones(G))


def test_loads_into_fpn_bottom_up(tmp_path):
    """Suffix matching: the same file loads into backbone.bottom_up of a detector's FPN."""
    src, _ = _checkpoint_file(tmp_path, "bn", "plain")
    out = str(tmp_path / "out.pkl")
    report = convert_file(src, out)
    model = build_r18("BN", fpn=True)
    inc = assert_loaded(model, out, report, prefix="bottom_up.")
    assert inc.missing_keys and all(k.startswith("fpn_") for k in inc.missing_keys)


# ---- tests: command line ------------------------------------------------------------------------

def test_the_former_name_is_an_alias():
    """d2-smallbn-convert and python -m d2_smallbn.convert run the same code (the installed commands'
    --help is compared in test_installed)."""
    import d2_smallbn.convert as alias
    import d2_smallbn.weights as weights

    assert alias.main is convert_main
    assert all(getattr(alias, name) is getattr(weights, name) for name in weights.__all__)


def _run(args, cwd):
    return subprocess.run([*COMMAND, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_report_and_strict(tmp_path, capsys):
    sd = resnet18_state("bn")
    sd["junk.weight"] = torch.zeros(2)
    src = _save(tmp_path / "r18.pth", {"model": sd})
    out = tmp_path / "sub" / "r18.pkl"
    out.parent.mkdir()
    proc = _run([src, out, "--target-norm", "mabn"], cwd=tmp_path / "sub")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "UNMAPPED" in proc.stdout and "  junk.weight: " in proc.stdout
    report = json.loads((tmp_path / "sub" / "r18.report.json").read_text())
    assert [u["key"] for u in report["unmapped"]] == ["junk.weight"]
    assert report["output"] == str(out) and report["target_norm"] == "mabn"
    assert "res2.0.conv1.norm.running_sqmean" in _load_pkl(out)["model"]

    proc = _run([src, out, "--strict"], cwd=tmp_path)
    assert proc.returncode == 1 and "junk.weight" in proc.stdout and "--strict" in proc.stderr

    del sd["junk.weight"]  # in-process from here on (the same main() the script runs)
    assert convert_main([_save(tmp_path / "clean.pth", sd), str(tmp_path / "clean.pkl"), "--strict"]) == 0
    assert "every key was mapped" in capsys.readouterr().out


BAD_INPUTS = {  # name: (message fragment, how to write the input)
    "missing": ("not found", None),
    "not_a_checkpoint": ("cannot be read by torch.load", lambda p: p.write_text("hello")),
    "truncated": ("cannot be read by torch.load", lambda p: _truncated(p)),
    "no_tensors": ("no state dict of tensors", lambda p: torch.save({"epoch": 3, "lr": 0.1}, p)),
    "not_resnet": ("no torchvision ResNet keys",
                   lambda p: torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(3)}, p)),
    "pickled_object": ("--trust-pickle",
                       lambda p: torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "args": Path("x")}, p)),
    "bad_output": ("does not end with .pkl", lambda p: torch.save({"conv1.weight": torch.zeros(1)}, p)),
}


def _truncated(path):
    torch.save({f"layer1.0.conv{i}.weight": torch.rand(64, 64, 3, 3) for i in (1, 2)}, path)
    path.write_bytes(path.read_bytes()[:50000])


def _bad_input_args(d, name):
    src = d / f"{name}.pth"
    if BAD_INPUTS[name][1] is not None:
        BAD_INPUTS[name][1](src)
    return [str(src), str(d / (f"{name}.pth" if name == "bad_output" else f"{name}.pkl"))]


def _check_one_line_error(code, out, err, what):
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and BAD_INPUTS[what][0] in lines[0] and ". Fix: " in lines[0], lines[0]
    assert out == ""


@pytest.mark.parametrize("what", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2(tmp_path, capsys, what):
    code = convert_main(_bad_input_args(tmp_path, what))
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err, what)


@pytest.mark.slow
def test_cli_bad_input_one_line_exit_2(tmp_path):
    proc = _run(_bad_input_args(tmp_path, "truncated"), cwd=tmp_path)
    _check_one_line_error(proc.returncode, proc.stdout, proc.stderr, "truncated")


def test_trust_pickle_reads_checkpoints_with_objects(tmp_path):
    src = _save(tmp_path / "in.pth", {"state_dict": resnet18_state("bn"), "args": Path("x")})
    with pytest.raises(ConvertError, match="--trust-pickle"):
        convert_file(src, str(tmp_path / "a.pkl"))
    report = convert_file(src, str(tmp_path / "a.pkl"), trust_pickle=True)
    assert report["unmapped"] == [] and report["num_output_keys"] == 120  # 20 convs, 20 BN x 5


@pytest.mark.parametrize("alias", ["same", "relative", "symlink"])
def test_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, capsys, monkeypatch, alias):
    """`d2-smallbn-convert r18.pkl r18.pkl` used to exit 0 and overwrite its input."""
    src = tmp_path / "r18.pkl"
    torch.save({"model": resnet18_state("bn")}, src)
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    output = {"same": str(src), "relative": "./r18.pkl", "symlink": str(tmp_path / "link.pkl")}[alias]
    if alias == "symlink":
        os.symlink(src, output)
    code = convert_main([str(src), output])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "is the input" in captured.err and ". Fix: " in captured.err and "Traceback" not in captured.err
    assert src.read_bytes() == before
    # the report may not overwrite the input either
    report_clash = tmp_path / "w.report.json"
    torch.save({"model": resnet18_state("bn")}, report_clash)
    before = report_clash.read_bytes()
    assert convert_main([str(report_clash), str(tmp_path / "w.pkl")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert report_clash.read_bytes() == before and not (tmp_path / "w.pkl").exists()


def test_report_path_that_is_the_output_is_refused_and_nothing_written(tmp_path, capsys):
    """`d2-smallbn-convert IN OUT --report OUT` used to write the weights, then the JSON report over them."""
    src = _save(tmp_path / "r18.pth", resnet18_state("bn"))
    out = tmp_path / "r18.pkl"
    out.write_bytes(b"weights of an earlier conversion")
    code = convert_main([src, str(out), "--report", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: ") and ". Fix: " in lines[0], lines
    assert "--report" in lines[0] and "output" in lines[0], lines[0]
    assert out.read_bytes() == b"weights of an earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pkl", "r18.pth"]



@pytest.mark.parametrize("target, conv, transform", [("mabn", "CenteredConv2d", "centered"), ("bcn", "WSConv2d", "ws")])
def test_bn_weights_into_a_norm_whose_conv_transforms_them_say_so_and_name_conv_plain(target, conv, transform,
                                                                                     tmp_path, capsys):
    """Centring or WS applied to weights trained without it changes the features: the report and the
    command's output say so and name MODEL.SMALLBN.CONV plain; --conv plain records it (hint), and
    --conv of the norm's own transform silences it."""
    torch.save(resnet18_state("bn"), tmp_path / "r18.pth")
    out = tmp_path / "r18.pkl"
    assert convert_main([str(tmp_path / "r18.pth"), str(out), "--target-norm", target]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r18.report.json").read_text())
    for text in (printed, " ".join(report["notes"])):
        assert f"({conv}) applies" in text and "changes the pretrained features" in text, text
        assert "MODEL.SMALLBN.CONV plain" in text and f"--conv {transform}" in text
    assert convert_main([str(tmp_path / "r18.pth"), str(out), "--target-norm", target, "--conv", "plain"]) == 0
    report = json.loads((tmp_path / "r18.report.json").read_text())
    assert report["config_hints"]["MODEL.SMALLBN.CONV"] == "plain"
    capsys.readouterr()
    assert convert_main([str(tmp_path / "r18.pth"), str(out), "--target-norm", target, "--conv", transform]) == 0
    report = json.loads((tmp_path / "r18.report.json").read_text())
    assert not any("changes the pretrained features" in n for n in report["notes"])
    assert "changes the pretrained features" not in capsys.readouterr().out
