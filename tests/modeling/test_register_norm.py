"""A user's own norm, registered from outside the package with ``d2_smallbn.register_norm``, goes
through every path the built-in norms do: the YAML key and MODEL.SMALLBN.<NAME> with its checks, a
LazyConfig ``norm=`` string, build and training with the hook (and the optimizer's norm rule),
checkpoint and resume, weight conversion (``d2_smallbn.weights``) from a torchvision BN checkpoint,
folding, and the layer and model benchmarks by its name. A second toy norm, whose statistics are not a BatchNorm's, converts from a BN
checkpoint as its layer maps it and from checkpoints of its own layout. The toy norms live only in
this file."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from tiny_detector import tiny_cfg
from torch import nn

import d2_smallbn
from d2_smallbn.layers._common import StepCounter
from d2_smallbn.norms import EPS, NORMS, NormSpec, Phase, Setting, integer, number


class BlendedBatchNorm2d(StepCounter):
    """BN that, after ``warmup_iters`` training steps, normalizes with ``blend`` x batch statistics +
    (1 - blend) x running statistics. Eval: plain BN with the running statistics."""

    own_state = ("num_steps",)

    def __init__(self, num_features, blend=0.5, warmup_iters=1, momentum=0.1, eps=1e-5):
        super().__init__()
        self.blend, self.warmup_iters, self.momentum, self.eps = blend, warmup_iters, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if not self.uses_batch:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        step = self._begin_step()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        if step >= self.warmup_iters:
            mean = self.blend * mean + (1 - self.blend) * self.running_mean
            var = self.blend * var + (1 - self.blend) * self.running_var
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        self._end_step()
        scale = torch.rsqrt(var + self.eps) * self.weight
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


class PowerNorm2d(StepCounter):
    """Divides by the root of the mean of x^2 (no centring); eval uses ``running_power``, the running
    mean of x^2, which a BatchNorm's statistics give as running_var + running_mean^2."""

    own_state = ("num_steps", "running_power")

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_power", torch.ones(num_features))

    @staticmethod
    def map_bn_state(state_dict, prefix):
        mean = state_dict.pop(prefix + "running_mean")
        var = state_dict.pop(prefix + "running_var")
        state_dict.pop(prefix + "num_batches_tracked", None)
        state_dict[prefix + "running_power"] = var + mean ** 2
        return "running_power = running_var + running_mean^2"

    def forward(self, x):
        power = self.running_power
        if self.uses_batch:
            self._begin_step()
            power = x.square().mean((0, 2, 3))
            with torch.no_grad():
                self.running_power.lerp_(power.detach(), self.momentum)
            self._end_step()
        scale = self.weight * torch.rsqrt(power + self.eps)
        return x * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


POWER = NormSpec("TOYPOW", PowerNorm2d, None, False, {"EPS": EPS}, lambda t, scope: dict(eps=t.EPS),
                 doc="a test's own norm with statistics of its own")


def warmup_from_epochs(layers, section, run):
    if section.WARMUP_EPOCHS > 0:
        for layer in layers:
            layer.warmup_iters = round(section.WARMUP_EPOCHS * run.dataset_size / run.ims_per_batch)
    return ["toy warmup set"]


TOY = NormSpec(
    "TOYBN", BlendedBatchNorm2d, None, False,
    {"BLEND": Setting(0.5, number(0, 1), "weight of the batch statistics after the warmup"),
     "WARMUP_ITERS": Setting(1, integer(0), "plain BN before this iteration"),
     "WARMUP_EPOCHS": Setting(0.0, number(0), "if > 0, overrides WARMUP_ITERS (the hook converts it)"),
     "EPS": EPS},
    lambda t, scope: dict(blend=t.BLEND, warmup_iters=t.WARMUP_ITERS, eps=t.EPS),
    phases=lambda t: [Phase("WARMUP_ITERS", 0, "nothing to forget")],
    before_train=warmup_from_epochs, needs_dataset_size=lambda t: t.WARMUP_EPOCHS > 0,
    doc="a test's own norm")


@pytest.fixture
def toy():
    d2_smallbn.register_norm(TOY)
    yield TOY
    d2_smallbn.unregister_norm("TOYBN")
    assert "TOYBN" not in NORMS


@pytest.fixture
def power():
    d2_smallbn.register_norm(POWER)
    yield POWER
    d2_smallbn.unregister_norm("TOYPOW")


def toys(model):
    return [m for m in model.modules() if isinstance(m, BlendedBatchNorm2d)]


def toy_cfg(tmp_path, iters=2, **smallbn):
    cfg = tiny_cfg("TOYBN", fpn="TOYBN", box="TOYBN", mask="TOYBN", output_dir=str(tmp_path), iters=iters)
    for key, value in smallbn.items():
        cfg.MODEL.SMALLBN.TOYBN[key] = value
    return cfg


def test_register_refuses_a_bad_spec_and_a_taken_name(toy):
    for name in ("CBN", "TOYBN", "BN", "FROZENBN", "CONV", "AUTO"):
        with pytest.raises(ValueError, match="taken"):
            d2_smallbn.register_norm(TOY._replace(name=name, layer=type("Other", (BlendedBatchNorm2d,), {})))
    with pytest.raises(ValueError, match="already the layer of TOYBN"):
        d2_smallbn.register_norm(TOY._replace(name="OTHER"))
    bad = TOY._replace(name="OTHER", layer=nn.BatchNorm2d, settings={"BLEND": Setting(2.0, number(0, 1))})
    with pytest.raises(ValueError, match="fails its own check"):
        d2_smallbn.register_norm(bad)
    with pytest.raises(ValueError, match="NormSpec"):
        d2_smallbn.register_norm({"name": "OTHER"})
    assert set(NORMS) == {"CBN", "MABN", "BCN", "BRN", "TOYBN"}


def test_yaml_key_and_its_section_build_the_norm_and_are_checked(toy, tmp_path):
    import detectron2.modeling

    from d2_smallbn.config import check_smallbn_config

    path = tmp_path / "toy.yaml"
    path.write_text("MODEL:\n  RESNETS:\n    NORM: TOYBN\n  SMALLBN:\n    TOYBN:\n      BLEND: 0.25\n")
    cfg = toy_cfg(tmp_path)
    cfg.merge_from_file(str(path))
    check_smallbn_config(cfg)
    model = detectron2.modeling.build_model(cfg)
    assert len(toys(model)) > 20 and {m.blend for m in toys(model)} == {0.25}
    cfg.merge_from_list(["MODEL.SMALLBN.TOYBN.BLEND", 2.0])
    with pytest.raises(ValueError, match=r"MODEL.SMALLBN.TOYBN.BLEND = 2.0 is invalid"):
        check_smallbn_config(cfg)


def test_lazy_config_norm_string_builds_the_norm(toy):
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.modeling.backbone import BasicStem
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": L(BasicStem)(in_channels=3, out_channels=64, norm="TOYBN"),
                            "smallbn": {"TOYBN": {"BLEND": 0.75}}, "optimizer": {"lr": 0.01}})
    model = d2_smallbn.convert_model(instantiate(cfg.model), cfg)
    assert [m.blend for m in toys(model)] == [0.75]


def test_trains_with_the_hook_then_resumes_and_folds(toy, tiny_dataset, tmp_path):
    from d2_smallbn.engine import SmallBNTrainer
    from d2_smallbn.modeling import fold_model

    cfg = toy_cfg(tmp_path, iters=2, WARMUP_ITERS=5, WARMUP_EPOCHS=0.5)  # 0.5 x 4 images / 2 per iteration: 1
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4, 0.0
    trainer = SmallBNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    first = toys(trainer.model)[0]
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decay[id(first.weight)] == 0.0  # the optimizer's norm rule
    trainer.train()
    assert {int(m.num_steps) for m in toys(trainer.model)} == {2}  # the hook drove both iterations
    assert {m.warmup_iters for m in toys(trainer.model)} == {1}  # its before_train, with the dataset size
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    cfg = cfg.clone()
    cfg.SOLVER.MAX_ITER = 3
    resumed = SmallBNTrainer(cfg)
    resumed.resume_or_load(resume=True)  # model_final.pth of the run above
    assert resumed.start_iter == 2
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    resumed.train()
    assert {int(m.num_steps) for m in toys(resumed.model)} == {3}

    backbone = resumed.model.backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    folded = fold_model(backbone)
    assert not toys(folded) and len(toys(backbone)) > 20
    with torch.no_grad():
        for level, out in backbone(x).items():
            torch.testing.assert_close(folded(x)[level], out, rtol=1e-4, atol=1e-4)


def run_as_user(tmp_path, module, *args, norm_modules=""):
    """``python -m module args`` in a process of its own (one thread), as a user runs a command: a module of
    the user's that registers the toy norm, ``toy_norm_module``, is importable (its folder on PYTHONPATH),
    and D2_SMALLBN_NORM_MODULES is ``norm_modules``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "toy_norm_module.py").write_text("import d2_smallbn\nfrom test_register_norm import TOY\n\n"
                                                 "d2_smallbn.register_norm(TOY)\n")
    here = Path(__file__).resolve().parent
    path = [str(tmp_path), str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "D2_SMALLBN_NORM_MODULES": norm_modules,
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=here.parents[1], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_benchmarks_measure_it_by_its_name(tmp_path, monkeypatch, capsys):
    """The layer and the model benchmark, commands in processes of their own, measure the toy norm by its
    name once a module of the user's that registers it is named (D2_SMALLBN_NORM_MODULES, --norm-module);
    without that module the name is refused, naming the remedy (checked through the command's parser here,
    where the toy norm is not registered: exit code 2, as the process's)."""
    import json

    from d2_smallbn.bench import layers

    monkeypatch.delenv("D2_SMALLBN_NORM_MODULES", raising=False)
    assert "TOYBN" not in NORMS
    with pytest.raises(SystemExit) as refused:
        layers.parse_args(["--norms", "TOYBN", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "no norm 'TOYBN'" in err and "--norm-module" in err

    out = tmp_path / "layers"
    proc = run_as_user(tmp_path, "d2_smallbn.bench.layers", "--norms", "toybn", "--channels", "16", "--groups", "4",
                       "--shapes", "8x8", "--iters", "1", "--warmup", "0", "--device", "cpu", "--out", str(out),
                       norm_modules="toy_norm_module")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "benchmark_layers.json").read_text())
    assert report["train_settings"][-1] == "toybn" and {"toybn", "toybn_folded"} <= set(report["eval_settings"])
    assert report["settings"]["toybn"] == "TOYBN (plain conv)"
    assert report["config"]["norm_settings"]["TOYBN"]["WARMUP_ITERS"] == 0  # its phase at its shortest
    check = report["fold_check"]["toybn"]
    assert check["max_abs_err"] <= 1e-4 * max(check["max_abs_ref"], 1.0)
    res = report["results"]["8x8"]
    assert res["train"]["toybn"]["ratio_vs_bn"]["median"] > 0 and res["memory"]["toybn"]["ratio_vs_bn"] > 0
    assert res["eval"]["toybn_folded"]["ratio_vs_toybn"]["median"] > 0
    assert "| TOYBN (plain conv) |" in proc.stdout and "| TOYBN folded (eval only) |" in proc.stdout

    out = tmp_path / "model"
    proc = run_as_user(tmp_path, "d2_smallbn.bench.model", "--norm-module", "toy_norm_module", "--tiny",
                       "--settings", "TOYBN", "--iters", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
                       "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert report["config"]["settings"] == ["frozen_none", "frozen_bn", "bn", "toybn"]
    assert report["settings_description"]["toybn"] == {"backbone": "TOYBN", "fpn_and_heads": "TOYBN", "conv": "auto",
                                                        "reference": "bn", "label": "TOYBN everywhere"}
    defaults = {key: setting.default for key, setting in TOY.settings.items()}
    assert report["config"]["norm_settings"] == {"TOYBN": {**defaults, "WARMUP_ITERS": 0}}
    assert report["fold_check"]["toybn"]["detections_matched_fraction"] >= 0.9
    res = report["results"]
    assert res["train"]["toybn"]["ratio_vs_bn"]["median"] > 0 and res["memory"]["toybn"]["ratio_vs_bn"] > 0
    assert res["infer_folded"]["toybn"]["ratio_vs_frozen_none_folded"]["median"] > 0
    assert "| toybn: TOYBN everywhere | bn |" in proc.stdout


def test_convert_weights_maps_a_torchvision_bn_checkpoint_onto_it(toy, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    from d2_smallbn.weights import convert_file

    src, out = tmp_path / "resnet18.pth", tmp_path / "r18_toy.pkl"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    report = convert_file(str(src), str(out), target_norm="toybn")
    assert report["targets_used"] == {"toybn": 20}
    assert report["config_hints"]["MODEL.RESNETS.NORM"] == "TOYBN"
    assert report["expected_missing_on_load"] == []  # its counter starts fresh: the layer's loads_as_bn

    cfg = toy_cfg(tmp_path)
    backbone = d2_smallbn.convert_model(build_resnet_backbone(cfg, ShapeSpec(channels=3)), cfg)
    checkpointer = DetectionCheckpointer(backbone)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(out)))
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert incompatible.missing_keys == []
    loaded = toys(backbone)[0].running_var
    assert torch.equal(loaded, torch.load(src)["bn1.running_var"])


@pytest.mark.slow
def test_the_conversion_command_converts_for_it_once_a_module_of_yours_registers_it(tmp_path, monkeypatch, capsys):
    """d2-smallbn-convert-weights, in a process of its own, knows the toy norm by name once a module of the
    user's that registers it is named with --norm-module; without it, --target-norm toybn is refused."""
    import json

    from d2_smallbn.weights.cli import main as convert_main

    src, out = tmp_path / "resnet18.pth", tmp_path / "r18_toy.pkl"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    arguments = [str(src), str(out), "--target-norm", "toybn", "--strict"]
    monkeypatch.delenv("D2_SMALLBN_NORM_MODULES", raising=False)
    with pytest.raises(SystemExit) as refused:
        convert_main(arguments)
    assert refused.value.code == 2 and "invalid choice: 'toybn'" in capsys.readouterr().err and not out.exists()

    done = run_as_user(tmp_path, "d2_smallbn.weights", *arguments, "--norm-module", "toy_norm_module")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r18_toy.report.json").read_text())
    assert report["targets_used"] == {"toybn": 20} and report["unmapped"] == []
    assert report["config_hints"]["MODEL.RESNETS.NORM"] == "TOYBN"


def random_statistics(state, seed=0):
    """``state`` with random running statistics (variances and powers positive), so that equality means something."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, value in state.items():
        if key.endswith(("running_var", "running_power")):
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith("running_mean"):
            out[key] = torch.randn(value.shape, generator=generator)
    return out


def load_toy_backbone(cfg, path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    backbone = d2_smallbn.convert_model(build_resnet_backbone(cfg, ShapeSpec(channels=3)), cfg)
    checkpointer = DetectionCheckpointer(backbone)
    return backbone, checkpointer._load_model(checkpointer._load_file(str(path)))


def test_convert_weights_maps_bn_statistics_as_the_layer_of_a_norm_with_its_own_statistics(power, tmp_path):
    from d2_smallbn.weights import convert_file, is_expected_missing

    src, out = tmp_path / "resnet18.pth", tmp_path / "r18_power.pkl"
    state = random_statistics(torchvision.models.resnet18().state_dict())
    torch.save(state, src)
    report = convert_file(str(src), str(out), target_norm="toypow")
    assert report["targets_used"] == {"toypow": 20} and report["unmapped"] == []
    assert report["config_hints"]["MODEL.RESNETS.NORM"] == "TOYPOW"

    backbone, incompatible = load_toy_backbone(tiny_cfg("TOYPOW"), out)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert incompatible.missing_keys and all(k.endswith(".num_steps") for k in incompatible.missing_keys)
    assert all(is_expected_missing(k, report["expected_missing_on_load"]) for k in incompatible.missing_keys)
    mean, var = state["layer3.1.bn2.running_mean"], state["layer3.1.bn2.running_var"]
    torch.testing.assert_close(backbone.res4[1].conv2.norm.running_power, var + mean ** 2, rtol=0, atol=0)


def test_convert_weights_reads_checkpoints_of_a_norms_own_layout(power, tmp_path):
    from d2_smallbn.weights import convert_file, convert_state_dict

    state = random_statistics(torchvision.models.resnet18(norm_layer=PowerNorm2d).state_dict())
    state = {k: torch.full_like(v, 9) if k.endswith("num_steps") else v for k, v in state.items()}
    src, out = tmp_path / "resnet18_power.pth", tmp_path / "r18_power.pkl"
    torch.save(state, src)
    report = convert_file(str(src), str(out))  # --target-norm auto: the norm whose layout it is
    assert report["source_norm_layouts"] == {"TOYPOW": 20} and report["targets_used"] == {"toypow": 20}
    assert report["unmapped"] == []
    assert {d["key"] for d in report["dropped"]} == {k for k in state if k.endswith("num_steps") or k.startswith("fc.")}

    backbone, incompatible = load_toy_backbone(tiny_cfg("TOYPOW"), out)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert incompatible.missing_keys and all(k.endswith(".num_steps") for k in incompatible.missing_keys)
    norm = backbone.res3[0].shortcut.norm
    for leaf in ("weight", "bias", "running_power"):
        assert torch.equal(getattr(norm, leaf), state[f"layer2.0.downsample.1.{leaf}"]), leaf
    assert int(norm.num_steps) == 0  # its training state starts fresh

    unmapped = convert_state_dict(state, target_norm="bn")["unmapped"]
    assert len(unmapped) == 20 * 4 and all("cannot become BN" in u["reason"] for u in unmapped)


@pytest.mark.slow
def test_the_accuracy_study_trains_it_by_its_name_on_processes(tmp_path, monkeypatch, capsys):
    """The per-GPU accuracy study runs the toy norm by its name: the study and each quickstart run it starts
    (2 processes x 1 image) import the user's module; the run trains the quickstart model with the toy norm
    in backbone, FPN and both heads and records its statistics error. Without the module the name is
    refused, naming the remedy."""
    import json

    import yaml

    out = tmp_path / "study"
    args = ["--gpus", "2", "--iters", "2", "--num-train", "4", "--num-val", "2", "--data-root", str(tmp_path / "data"),
            "--out", str(out), "--seeds", "0", "--settings", "toybn", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
    from d2_smallbn.bench.study_accuracy import parse_args

    monkeypatch.delenv("D2_SMALLBN_NORM_MODULES", raising=False)
    assert "TOYBN" not in NORMS
    with pytest.raises(SystemExit) as refused:  # the command's parser, here where the toy norm is not registered
        parse_args(args)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "unknown --settings ['toybn']" in err and "--norm-module" in err

    proc = run_as_user(tmp_path, "d2_smallbn.bench.study_accuracy", "--norm-module", "toy_norm_module", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = yaml.safe_load((out / "runs" / "toybn_seed0" / "config.yaml").read_text())["MODEL"]
    assert {model[key]["NORM"] for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")} == {"TOYBN"}
    assert model["SMALLBN"]["TOYBN"]["BLEND"] == TOY.settings["BLEND"].default
    entry = json.loads((out / "study_accuracy.json").read_text())["settings"]["toybn"]
    assert entry["processes"] == 2 and entry["iterations"] == 2
    error = entry["seeds"]["0"]["statistics_error"]  # each process normalizes with its own image: not the batch's
    assert error["records"] == 1 and error["var"] > 1e-3
