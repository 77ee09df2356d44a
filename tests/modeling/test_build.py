"""Building detectors with our norm names: every position, conv types, frozen stages, config
validation, optimizer groups and loading BN checkpoints."""
import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from detectron2.modeling import build_model

from tiny_detector import tiny_cfg
from d2_smallbn.config import check_smallbn_config
from d2_smallbn.engine import optimizer_param_groups
from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                               MovingAverageBatchNorm2d, NormStateDriver, WSConv2d)
from d2_smallbn.modeling import PendingNorm, PerLevelNorm, convert_model

NORM = {"CBN": CrossIterationBatchNorm2d, "MABN": MovingAverageBatchNorm2d, "BCN": BatchChannelNorm2d}
CONV = {"CBN": CBNConv2d, "MABN": CenteredConv2d, "BCN": WSConv2d}


def normed_convs(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and getattr(m, "norm", None) is not None]


@pytest.mark.parametrize("norm", ["CBN", "MABN", "BCN"])
@pytest.mark.parametrize("position", ["backbone", "fpn", "box", "mask"])
def test_norm_in_each_position_gets_its_conv_and_others_stay(norm, position):
    cfg = tiny_cfg(**{"backbone": "FrozenBN", position: norm})
    model = build_model(cfg)
    parts = {"backbone": model.backbone.bottom_up, "fpn": model.backbone,
             "box": model.roi_heads.box_head, "mask": model.roi_heads.mask_head}
    ours = [c for c in normed_convs(model) if isinstance(c.norm, NORM[norm])]
    expected = {"backbone": 20, "fpn": 8, "box": 4, "mask": 4}[position]  # R18: stem + 16 + 3 shortcuts
    assert len(ours) == expected
    for conv in ours:
        assert type(conv) is CONV[norm]
        assert any(conv is m for m in parts[position].modules())
        if norm == "CBN":
            assert conv.bias is None and conv.norm._conv_shape[0] == tuple(conv.weight.shape)
    others = [c for c in normed_convs(model) if not isinstance(c.norm, NORM[norm])]
    assert all(type(c) is Conv2d and isinstance(c.norm, FrozenBatchNorm2d) for c in others)
    # convs without a norm stay plain: RPN head, predictors, deconv, box fc
    assert type(model.proposal_generator.rpn_head.conv) is Conv2d
    assert type(model.roi_heads.mask_head.predictor) is Conv2d
    assert type(model.roi_heads.mask_head.deconv).__name__ == "ConvTranspose2d"
    assert type(model.roi_heads.box_head.fc1) is torch.nn.Linear


def test_hyper_parameters_come_from_the_config():
    cfg = tiny_cfg(backbone="MABN", fpn="MABN", box="CBN", mask="BCN")
    s = cfg.MODEL.SMALLBN
    s.MABN.WARMUP_ITERS, s.MABN.FPN_WARMUP_ITERS, s.MABN.HEADS_WARMUP_ITERS = 7, 8, 9
    s.CBN.WINDOW_SIZE, s.CBN.RHO, s.BCN.NUM_GROUPS, s.WS.MODE = 5, 0.5, 4, "var"
    model = build_model(cfg)
    mabn = {n: m for n, m in model.named_modules() if isinstance(m, MovingAverageBatchNorm2d)}
    assert {m.warmup_iters for n, m in mabn.items() if n.startswith("backbone.bottom_up.")} == {7}
    assert {m.warmup_iters for n, m in mabn.items() if n.startswith("backbone.fpn")} == {8}
    cbn = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert {(m.window_size, m.rho) for m in cbn} == {(5, 0.5)}
    bcn = [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    assert {m.num_groups for m in bcn} == {4}
    assert all(float(m.update_rate) == pytest.approx(cfg.SOLVER.BASE_LR) for m in bcn)  # never silently GN
    assert {c.ws_mode for c in model.modules() if isinstance(c, WSConv2d)} == {"var"}


def test_mabn_heads_warmup_scope():
    cfg = tiny_cfg(backbone="MABN", box="MABN")
    cfg.MODEL.SMALLBN.MABN.HEADS_WARMUP_ITERS = 10000
    model = build_model(cfg)
    heads = [m for m in model.roi_heads.modules() if isinstance(m, MovingAverageBatchNorm2d)]
    assert len(heads) == 4 and {m.warmup_iters for m in heads} == {10000}


@pytest.mark.parametrize("conv_type,expected", [("ws", WSConv2d), ("centered", CenteredConv2d), ("plain", Conv2d)])
def test_explicit_conv_type_for_baselines(conv_type, expected):
    cfg = tiny_cfg(backbone="GN", fpn="GN", box="GN", mask="GN")
    cfg.MODEL.SMALLBN.CONV = conv_type
    model = build_model(cfg)
    convs = normed_convs(model)
    assert len(convs) == 36 and all(type(c) is expected and isinstance(c.norm, torch.nn.GroupNorm) for c in convs)


@pytest.mark.parametrize("norm", ["CBN", "MABN", "BCN"])
def test_frozen_stages_freeze_our_norms(norm):
    cfg = tiny_cfg(backbone=norm)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = build_model(cfg)
    frozen_prefixes = ("backbone.bottom_up.stem", "backbone.bottom_up.res2")
    norms = {n: m for n, m in model.named_modules() if isinstance(m, NORM[norm])}
    for name, m in norms.items():
        assert m.frozen == name.startswith(frozen_prefixes), name
        assert all(p.requires_grad != m.frozen for p in m.parameters())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(frozen_prefixes)}
    images = torch.rand(2, 3, 64, 64) * 255
    model.backbone(images)  # a training-mode forward through the frozen stages
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_stock_names_work_and_unknown_names_list_the_valid_ones():
    assert isinstance(get_norm("GN", 64), torch.nn.GroupNorm)
    pending = get_norm("CBN", 64)  # built with its settings by the conversion pass
    assert isinstance(pending, PendingNorm) and (pending.name, pending.num_features) == ("CBN", 64)
    converted = convert_model(torch.nn.Sequential(Conv2d(8, 64, 3, bias=False, norm=pending)), {"CBN": {"RHO": 0.5}})
    assert isinstance(converted[0].norm, CrossIterationBatchNorm2d) and converted[0].norm.rho == 0.5
    with pytest.raises(ValueError, match=r"Unknown norm 'CNB'.*GN.*CBN, MABN, BCN"):
        get_norm("CNB", 64)
    cfg = tiny_cfg(backbone="MABM")
    with pytest.raises(ValueError, match="MABM"):
        build_model(cfg)


@pytest.mark.parametrize("key,value,match", [
    ("CBN.WINDOW_SIZE", 0, "CBN.WINDOW_SIZE"), ("MABN.BUFFER_SIZE", 0, "MABN.BUFFER_SIZE"),
    ("MABN.CLIP_LAMBDA", -1.0, "MABN.CLIP_LAMBDA"), ("BCN.UPDATE_RATE", "fast", "BCN.UPDATE_RATE"),
    ("BCN.UPDATE_RATE_MODE", "loss", "BCN.UPDATE_RATE_MODE"),
    ("WS.MODE", "l2", "WS.MODE"), ("CONV", "wx", "CONV"), ("CBN.RHO", -0.5, "CBN.RHO"),
])
def test_invalid_config_values_fail_at_config_time(key, value, match):
    cfg = tiny_cfg()
    node = cfg.MODEL.SMALLBN
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        check_smallbn_config(cfg)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_optimizer_counts_our_norm_parameters_as_norm_parameters():
    cfg = tiny_cfg(backbone="MABN", box="CBN", mask="BCN")
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4, 0.0
    model = build_model(cfg)
    groups = optimizer_param_groups(cfg, model)  # no "weight_decay" key: the optimizer default
    decay = {id(p): g.get("weight_decay", cfg.SOLVER.WEIGHT_DECAY) for g in groups for p in g["params"]}
    norm_params = [p for m in model.modules() if isinstance(m, tuple(NORM.values())) for p in m.parameters()]
    assert norm_params and all(decay[id(p)] == 0.0 for p in norm_params)
    conv_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(decay[id(p)] == 1e-4 for p in conv_weights)
    assert len(decay) == len([p for p in model.parameters() if p.requires_grad])


def test_retinanet_shared_head_gets_one_norm_per_level_and_trains():
    cfg = tiny_cfg(backbone="MABN", fpn="MABN", meta="RetinaNet")
    cfg.MODEL.RETINANET.NORM = "MABN"
    model = build_model(cfg)
    per_level = [m for m in model.head.modules() if isinstance(m, PerLevelNorm)]
    assert len(per_level) == 8 and all(len(p.norms) == 5 for p in per_level)
    assert all(type(c) is CenteredConv2d for c in model.head.cls_subnet if isinstance(c, torch.nn.Conv2d))
    model.train()
    norms = [n for p in per_level for n in p.norms]
    driver = NormStateDriver(model, update_rate=None)
    for it in range(2):
        driver.before_step(it)  # as the hook does: a second call per iteration would raise
        features = model.backbone(torch.rand(2, 3, 96, 128) * 255)
        model.head([features[f] for f in model.head_in_features])
    assert all(int(n.num_steps) == 2 for n in norms)


def test_loading_a_bn_checkpoint_maps_statistics_and_logs_it(tmp_path, caplog):
    bn_model = build_model(tiny_cfg(backbone="BN"))
    with torch.no_grad():
        for m in bn_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    torch.save({"model": bn_model.state_dict()}, tmp_path / "bn.pth")
    model = build_model(tiny_cfg(backbone="MABN"))
    with caplog.at_level(logging.INFO, logger="d2_smallbn.layers"):
        DetectionCheckpointer(model).load(str(tmp_path / "bn.pth"))
    bn = bn_model.backbone.bottom_up.res3[0].conv1.norm
    mabn = model.backbone.bottom_up.res3[0].conv1.norm
    torch.testing.assert_close(mabn.running_sqmean, bn.running_var + bn.running_mean ** 2)
    assert "running_sqmean = running_var + running_mean^2" in caplog.text


def test_a_named_norm_whose_conv_was_never_converted_refuses_to_run():
    conv = Conv2d(8, 16, 3, padding=1, bias=False, norm=get_norm("MABN", 16))
    with pytest.raises(RuntimeError, match="never converted"):
        conv(torch.randn(2, 8, 5, 5))
    wrapper = torch.nn.Sequential(conv)
    convert_model(wrapper)
    assert type(wrapper[0]) is CenteredConv2d and wrapper[0](torch.randn(2, 8, 5, 5)).shape == (2, 16, 5, 5)


def test_fixed_bcn_update_rate_loads_from_yaml_command_line_and_a_dumped_config(tmp_path):
    from detectron2.config import get_cfg

    from d2_smallbn import add_smallbn_config

    def fresh():
        return add_smallbn_config(get_cfg())

    fixed = ["MODEL.SMALLBN.BCN.UPDATE_RATE_MODE", "fixed", "MODEL.SMALLBN.BCN.UPDATE_RATE", "0.1"]
    from_cli = fresh()
    from_cli.merge_from_list(fixed)  # the command line: values parsed from strings
    yaml_file = tmp_path / "fixed.yaml"
    yaml_file.write_text("MODEL:\n  SMALLBN:\n    BCN:\n      UPDATE_RATE_MODE: fixed\n      UPDATE_RATE: 0.1\n")
    from_yaml = fresh()
    from_yaml.merge_from_file(str(yaml_file))
    cfg = tiny_cfg(backbone="BCN", fpn="BCN")  # set from Python, then dumped as training does
    cfg.MODEL.SMALLBN.BCN.UPDATE_RATE_MODE, cfg.MODEL.SMALLBN.BCN.UPDATE_RATE = "fixed", 0.1
    dumped = tmp_path / "config.yaml"
    dumped.write_text(cfg.dump())
    reloaded = fresh()
    reloaded.merge_from_file(str(dumped))  # what --eval-only with OUTPUT_DIR/config.yaml does
    for c in (from_cli, from_yaml, reloaded):
        assert (c.MODEL.SMALLBN.BCN.UPDATE_RATE_MODE, c.MODEL.SMALLBN.BCN.UPDATE_RATE) == ("fixed", 0.1)
        check_smallbn_config(c)
    model = build_model(reloaded)
    rates = [float(m.update_rate) for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    assert len(rates) == 28 and rates == pytest.approx([0.1] * 28)  # 20 in the R18, 8 in the FPN

    # a rate without the mode would be silently ignored: it is an error naming the missing key
    cfg = tiny_cfg(backbone="BCN")
    cfg.merge_from_list(["MODEL.SMALLBN.BCN.UPDATE_RATE", "0.1"])
    with pytest.raises(ValueError, match="BCN.UPDATE_RATE.*UPDATE_RATE_MODE fixed"):
        check_smallbn_config(cfg)
    cfg.merge_from_list(["MODEL.SMALLBN.BCN.UPDATE_RATE_MODE", "fixed", "MODEL.SMALLBN.BCN.UPDATE_RATE", "0.0"])
    with pytest.raises(ValueError, match=r"BCN.UPDATE_RATE = 0.0 .*\(0, 1\]"):
        check_smallbn_config(cfg)


def test_bcn_groups_that_do_not_divide_the_channels_name_the_key_and_every_layer():
    cfg = tiny_cfg(backbone="BCN", fpn="BCN")  # R18: 64-512 channels; FPN: 32
    cfg.MODEL.SMALLBN.BCN.NUM_GROUPS = 64
    with pytest.raises(ValueError) as info:
        build_model(cfg)
    message = str(info.value)
    assert message.startswith("MODEL.SMALLBN.BCN.NUM_GROUPS = 64 does not divide the channels of 8 BCN layer(s): "
                              "backbone.fpn_lateral2.norm (32 channels)"), message
    assert "Fix: set MODEL.SMALLBN.BCN.NUM_GROUPS to a divisor of every BCN layer's channels (here: 32, 16, 8, 4)" \
        in message
    with pytest.raises(ValueError, match=r"NUM_GROUPS = 32 does not divide the channels of 1 BCN layer\(s\): 0 \(48"):
        convert_model(torch.nn.Sequential(get_norm("BCN", 48)))  # by name outside build_model (default settings)
    cfg.MODEL.SMALLBN.BCN.NUM_GROUPS = 32
    assert len([m for m in build_model(cfg).modules() if isinstance(m, BatchChannelNorm2d)]) == 28


def test_build_model_converts_once_so_he_init_runs_once(monkeypatch):
    from d2_smallbn.modeling import conversion

    calls = []
    he_init = conversion._he_init
    monkeypatch.setattr(conversion, "_he_init", lambda module: (calls.append(module), he_init(module)))
    cfg = tiny_cfg(backbone="MABN", fpn="MABN", box="MABN")
    cfg.MODEL.SMALLBN.INIT = "he"
    model = build_model(cfg)
    assert len(calls) == 1 and calls[0] is model  # the whole model, once; the backbone builder converts nothing


def test_importing_the_plugin_patches_only_get_norm_and_build_model():
    import sys

    import detectron2.engine.defaults
    import detectron2.layers
    import detectron2.modeling

    from d2_smallbn.engine.ddp import _original as original_create_ddp_model

    assert detectron2.engine.defaults.create_ddp_model is original_create_ddp_model
    assert getattr(original_create_ddp_model, "_smallbn_original", None) is None
    def replaced(value):
        try:  # some module attributes are lazy proxies that raise on any attribute access without detectron2._C
            return getattr(value, "_smallbn_original", None) is not None
        except Exception:
            return False

    patched = {value.__name__ for name, module in list(sys.modules.items()) if name.startswith("detectron2")
               for value in list(getattr(module, "__dict__", {}).values()) if replaced(value)}
    assert patched == {"get_norm", "build_model"}
    assert detectron2.layers.get_norm._smallbn_original is not None
    assert detectron2.modeling.build_model._smallbn_original is not None


@pytest.mark.slow
def test_model_zoo_does_not_import_the_engine():
    import subprocess
    import sys

    code = ("import sys\n"
            "from d2_smallbn import model_zoo\n"
            "model_zoo.get_config('mask_rcnn_R50_FPN_cbn.yaml')\n"
            "assert not any(m.startswith('d2_smallbn.engine') for m in sys.modules), sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("norm", ["CBN", "MABN", "BCN"])
def test_each_named_norm_is_built_once(norm, monkeypatch):
    from d2_smallbn.norms import NormSpec

    built = []
    build = NormSpec.build
    monkeypatch.setattr(NormSpec, "build", lambda spec, *args: built.append(build(spec, *args)) or built[-1])
    model = build_model(tiny_cfg(backbone=norm, fpn=norm, box=norm, mask=norm))
    norms = [m for m in model.modules() if isinstance(m, NORM[norm])]
    assert len(norms) == 36 and len(built) == 36 and {id(m) for m in norms} == {id(m) for m in built}
