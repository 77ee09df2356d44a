"""A converted model is converted once: a second ``convert_model`` (a LazyConfig whose ``model`` is the
conversion already, a model loaded from a checkpoint) changes nothing, INIT "he" included; a model
with nothing to convert says so. RetinaNet's per-level norms compile like eager."""
import copy
import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import build_model

from tiny_detector import tiny_cfg
from d2_smallbn.layers import CenteredConv2d, NormActConv2d
from d2_smallbn.layers.brn import BatchRenorm2d
from d2_smallbn.modeling import PerLevelNorm, convert_model


def snapshot(model):
    """Every module's type and every parameter and buffer, bit for bit."""
    return [(name, type(m)) for name, m in model.named_modules()], copy.deepcopy(model.state_dict())


def assert_unchanged(model, before):
    structure, state = before
    assert [(name, type(m)) for name, m in model.named_modules()] == structure
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_second_conversion_of_a_loaded_model_changes_nothing_even_with_he_init(tmp_path, caplog):
    cfg = tiny_cfg(backbone="MABN", fpn="CBN", box="BCN", mask="BRN")
    cfg.MODEL.SMALLBN.INIT = "he"
    trained = build_model(cfg)
    with torch.no_grad():  # weights that are not He's: a checkpoint of a trained model
        for p in trained.parameters():
            p.uniform_(-0.5, 0.5)
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("trained")
    model = build_model(cfg)  # converted once, by build_model
    DetectionCheckpointer(model).load(str(tmp_path / "trained.pth"))
    before = snapshot(model)
    with caplog.at_level(logging.INFO, logger="d2_smallbn.conversion"):
        assert convert_model(model, cfg) is model
    assert_unchanged(model, before)
    assert "converted already" in caplog.text and "neither INIT nor this call's settings" in caplog.text


def test_second_conversion_with_other_settings_keeps_the_first_ones():
    model = convert_model(torch.nn.Sequential(Conv2d(8, 16, 3, bias=False, norm=get_norm("MABN", 16))),
                          {"CONV": "plain", "MABN": {"WARMUP_ITERS": 7}})
    before = snapshot(model)
    convert_model(model, {"INIT": "he"})  # the defaults would centre the conv (CONV auto) and re-initialize
    assert_unchanged(model, before)
    assert type(model[0]) is Conv2d and model[0].norm.warmup_iters == 7  # plain: detectron2's conv kept


def test_a_submodule_converted_on_its_own_is_left_alone_by_the_models_conversion():
    inner = convert_model(torch.nn.Sequential(Conv2d(8, 16, 3, bias=False, norm=get_norm("MABN", 16))),
                          {"INIT": "he"})
    with torch.no_grad():
        inner[0].weight.uniform_(-0.5, 0.5)
    before = snapshot(inner)
    outer = torch.nn.Sequential(inner, Conv2d(16, 16, 3, bias=False, norm=get_norm("MABN", 16)))
    convert_model(outer, {"INIT": "he"})
    assert_unchanged(inner, before)
    assert type(outer[1]) is CenteredConv2d


def test_norms_named_after_the_conversion_are_refused_with_the_fix():
    model = convert_model(torch.nn.Sequential(Conv2d(8, 16, 3, bias=False, norm=get_norm("MABN", 16))))
    model.append(Conv2d(16, 16, 3, bias=False, norm=get_norm("CBN", 16)))
    with pytest.raises(RuntimeError, match=r"converted already, but norms named by a config were added.*1\.norm.*"
                                           r"convert the new module on its own"):
        convert_model(model)


def test_nothing_to_convert_warns_naming_why():
    model = torch.nn.Sequential(Conv2d(3, 8, 3, norm=torch.nn.BatchNorm2d(8)), torch.nn.ReLU())
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"convert_model\(Sequential\): nothing to convert: it holds no norm named by "
                                         r"a config.*1 torch BatchNorm2d layer\(s\) \(e.g. '0.norm'\).*"
                                         r"d2_smallbn\.convert_batchnorm\(model, 'CBN'\)"):
        convert_model(model)
    assert_unchanged(model, before)


def test_per_level_norms_compile_like_eager():
    torch._dynamo.reset()
    norms = [BatchRenorm2d(8) for _ in range(3)]
    for level, norm in enumerate(norms):  # eval statistics that differ per level
        norm.running_mean.fill_(level)
        norm.running_var.fill_(level + 1.0)
    eager = NormActConv2d(4, 8, 3, padding=1, bias=False, norm=PerLevelNorm(norms)).eval()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="eager")
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        for call in range(6):  # two iterations of three levels
            torch.testing.assert_close(compiled(x), eager(x), msg=f"call {call}")
    torch._dynamo.reset()


def test_settings_are_resolved_once_and_what_trains_the_model_reads_them():
    """convert_model keeps the resolved settings it built the norms with; the trainer hook, given other
    settings or none, reads those (the layers and the hook cannot disagree)."""
    from types import SimpleNamespace

    from d2_smallbn.engine.hooks import SmallBNHook, model_settings

    cfg = tiny_cfg(backbone="CBN", fpn="CBN", box="CBN", mask="CBN")
    cfg.MODEL.SMALLBN.CBN.WINDOW_SIZE, cfg.MODEL.SMALLBN.CBN.BURNIN_ITERS = 3, 7
    model = build_model(cfg)
    s = model_settings(model)
    assert s.CBN.WINDOW_SIZE == 3 and s.CBN.BURNIN_ITERS == 7
    layers = [m for m in model.modules() if type(m).__name__ == "CrossIterationBatchNorm2d"]
    assert layers and all(m.window_size == 3 and m.burnin_iters == 7 for m in layers)
    assert model_settings(model, {"CBN": {"WINDOW_SIZE": 9}}) is s  # the model's, not the ones passed
    hook = SmallBNHook({"CBN": {"WINDOW_SIZE": 9}})
    hook.trainer = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    hook.before_train()
    assert hook.s is s
    plain = torch.nn.Conv2d(3, 3, 1)  # converted from nothing: the settings given, resolved
    assert model_settings(plain, {"CBN": {"WINDOW_SIZE": 9}}).CBN.WINDOW_SIZE == 9
