"""The pretrained regime at tiny size (issue 19): ``python -m d2_smallbn.bench.pretrain`` and the way
its checkpoints enter fine-tuning.

- The pretraining command (5 variants, 2 iterations of 16 crops of 32 px) writes torchvision's
  ResNet-18 names, a "done" report with the held-out accuracy, and its conversion commands.
- An interrupted run (stopped by --stop-after-iters, or killed by an error after a saved state) is
  reported incomplete, without a final checkpoint, and a rerun continues it to the same weights as
  an uninterrupted run; other settings for an existing state are refused.
- Each checkpoint converts through d2-smallbn-convert-weights and loads into each fine-tuning config kind
  (configs/pretrained/: FrozenBN, CBN and BN with FREEZE_AT 2, GN+WS, BCN+WS, centred BN into MABN
  and SyncBN) with no missing or unexpected backbone keys; through 2 fine-tuning iterations every
  FrozenBN's statistics and affine and every tensor of the stem and res2 stay bit-identical.
- A checkpoint whose depth, norm type, WS or centring does not fit the config stops the trainer
  before training, naming the mismatch and the conversion target or setting that fits.
"""
import json
import logging
import pickle
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d

import d2_smallbn  # noqa: F401  (registration)
from d2_smallbn.bench import pretrain
from d2_smallbn.engine import SmallBNTrainer
from d2_smallbn.engine.defaults import build_config
from d2_smallbn.engine.weights_check import WeightsMismatchError, backbone_problems
from d2_smallbn.weights import config_hints
from d2_smallbn.weights.cli import main as convert_main
from commands import installed
from generated_images import register_generated

TINY = ["--batch-size", "16", "--crop-size", "32", "--train-images", "3", "--val-images", "2", "--threads", "1",
        "--warmup-iters", "1", "--log-period", "1"]
DATASET = "smallbn_pretrain_tiny"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pretrain_data") / "scenes")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_root):
    """Every variant pretrained for 2 iterations: {variant: report}."""
    out = tmp_path_factory.mktemp("pretrained")
    assert pretrain.main(TINY + ["--iters", "2", "--out", str(out), "--data-root", data_root]) == pretrain.EXIT_DONE
    return {v: json.loads((out / v / pretrain.REPORT_FILE).read_text()) for v in pretrain.VARIANTS}


@pytest.fixture(scope="module")
def detection_dataset(tmp_path_factory):
    return register_generated(DATASET, tmp_path_factory.mktemp("finetune_images"))


def final_state(report):
    return torch.load(report["checkpoint"], map_location="cpu", weights_only=True)


# ---- the pretraining command ----------------------------------------------------------------------

def test_checkpoints_have_torchvisions_names(pretrained):
    bn = final_state(pretrained["bn"])
    reference = torchvision.models.resnet18(weights=None, num_classes=5)
    assert list(bn) == list(reference.state_dict())
    reference.load_state_dict(bn)  # strict: exactly a torchvision ResNet-18 checkpoint
    gn = torchvision.models.resnet18(weights=None, num_classes=5, norm_layer=lambda c: torch.nn.GroupNorm(32, c))
    for variant in ("gn", "gnws"):
        gn.load_state_dict(final_state(pretrained[variant]))
    bcn = final_state(pretrained["bcnws"])  # the BCN+WS authors' layout: bn.* and a per-group gn affine
    assert bcn["layer3.1.bn2.gn.weight"].shape == (32,) and "layer3.1.bn2.bn.running_var" in bcn
    assert set(final_state(pretrained["centered_bn"])) == set(bn)


def test_report_states_accuracy_settings_and_conversions(pretrained):
    for variant, report in pretrained.items():
        assert report["status"] == "done" and report["iteration"] == report["iters"] == 2
        accuracy = report["accuracy"]
        assert 0 <= accuracy["top1"] <= 1 and accuracy["num_crops"] == report["data"]["val"]["crops"] > 0
        assert set(accuracy["per_class_top1"]) == {"ellipse", "rectangle", "triangle", "star", "ring"}
        settings = report["settings"]
        assert (settings["variant"], settings["batch_size"], settings["data_seed"]) == (variant, 16, 1)
        assert "d2_smallbn.bench.pretrain" in report["command"] and report["device"]["type"] == "cpu"
        assert {c["target_norm"] for c in report["convert"]} == {t for t, _ in pretrain.VARIANTS[variant].conversions}
        for c in report["convert"]:
            assert c["command"].startswith("d2-smallbn-convert-weights ") and f"--conv {pretrain.VARIANTS[variant].conv}" \
                in c["command"]
    # the input normalization is the one weight conversion tells the fine-tuning config to use
    hints = config_hints({}, {"bn": 1}, 32)
    assert (tuple(hints["MODEL.PIXEL_MEAN"]), tuple(hints["MODEL.PIXEL_STD"]), hints["INPUT.FORMAT"]) == \
        (pretrain.PIXEL_MEAN, pretrain.PIXEL_STD, "RGB")


def _run(out, data_root, *extra):
    return pretrain.main(["--variants", "bn", "--iters", "4", "--checkpoint-period", "2"] + TINY
                         + ["--out", str(out), "--data-root", data_root, *extra])


def _status(out):
    return json.loads((out / "bn" / pretrain.REPORT_FILE).read_text())


def test_an_interrupted_run_is_resumed_and_never_reported_done(tmp_path, data_root, monkeypatch, capsys):
    assert _run(tmp_path / "whole", data_root) == pretrain.EXIT_DONE
    whole = final_state(_status(tmp_path / "whole"))

    # stopped on purpose after 2 of 4 iterations: incomplete, no final checkpoint, exit code 3
    stopped = tmp_path / "stopped"
    assert _run(stopped, data_root, "--stop-after-iters", "2") == pretrain.EXIT_INCOMPLETE
    report = _status(stopped)
    assert (report["status"], report["iteration"]) == ("incomplete", 2) and "accuracy" not in report
    assert not (stopped / "bn" / pretrain.FINAL_FILE).exists()
    assert "INCOMPLETE: iteration 2 of 4" in capsys.readouterr().out
    assert _run(stopped, data_root) == pretrain.EXIT_DONE
    assert "iterations 2 -> 4 of 4" in capsys.readouterr().out  # continued, not restarted
    assert all(torch.equal(v, whole[k]) for k, v in final_state(_status(stopped)).items())

    # killed by an error at iteration 3 (after the state saved at 2): incomplete, then continued
    killed = tmp_path / "killed"
    step = pretrain.train_step

    def failing_step(model, optimizer, crops, settings, iteration, device):
        if iteration == 3:
            raise RuntimeError("killed")
        return step(model, optimizer, crops, settings, iteration, device)

    monkeypatch.setattr(pretrain, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="killed"):
        _run(killed, data_root)
    assert (_status(killed)["status"], _status(killed)["iteration"]) == ("incomplete", 2)
    assert not (killed / "bn" / pretrain.FINAL_FILE).exists()
    monkeypatch.setattr(pretrain, "train_step", step)
    capsys.readouterr()
    assert _run(killed, data_root) == pretrain.EXIT_DONE
    assert "iterations 2 -> 4 of 4" in capsys.readouterr().out
    assert all(torch.equal(v, whole[k]) for k, v in final_state(_status(killed)).items())

    # an existing state with other settings is refused, naming them
    assert _run(killed, data_root, "--lr", "0.01") == pretrain.EXIT_BAD_INPUT
    assert "lr: 0.05 there, 0.01 now" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "8"], "at least 16 images per iteration"),
    (["--data-seed", "0"], "the built-in detection set's seed"),
    (["--variants", "bn,ws"], "unknown variant"),
])
def test_bad_arguments_are_refused(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--out", str(tmp_path)] + extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---- fine-tuning from the converted checkpoints -----------------------------------------------------

# config, its overrides, the pretrained variant, the conversion target
FINETUNE = {
    "frozenbn_heads_cbn": ("pretrained/mask_rcnn_R18_FPN_frozenbn_cbn.yaml", [], "bn", "frozenbn"),
    "cbn_everywhere": ("pretrained/mask_rcnn_R18_FPN_cbn_cbn.yaml", [], "bn", "cbn"),
    "bn_everywhere": ("pretrained/mask_rcnn_R18_FPN_cbn_cbn.yaml", ["MODEL.RESNETS.NORM", "BN"], "bn", "bn"),
    "gn_everywhere": ("pretrained/mask_rcnn_R18_FPN_cbn_cbn.yaml", ["MODEL.RESNETS.NORM", "GN"], "gn", "gn"),
    "bcnws": ("pretrained/mask_rcnn_R18_FPN_bcnws_bcnws.yaml", [], "bcnws", "bcn"),
    "gnws": ("pretrained/mask_rcnn_R18_FPN_bcnws_bcnws.yaml",
             ["MODEL.RESNETS.NORM", "GN", "MODEL.SMALLBN.CONV", "ws"], "gnws", "gn"),
    "mabn": ("pretrained/mask_rcnn_R18_FPN_mabn_mabn.yaml", [], "centered_bn", "mabn"),
    "syncbn_centered": ("pretrained/mask_rcnn_R18_FPN_mabn_mabn.yaml",
                        ["MODEL.RESNETS.NORM", "naiveSyncBN", "MODEL.SMALLBN.CONV", "centered"], "centered_bn",
                        "syncbn"),
}


def converted(pretrained, tmp_path, variant, target, conv=None):
    """d2-smallbn-convert-weights' command line on the variant's final checkpoint (--conv as pretrain prints it)."""
    out = tmp_path / f"{variant}-{target}.pkl"
    conv = pretrain.VARIANTS[variant].conv if conv is None else conv
    argv = [pretrained[variant]["checkpoint"], str(out), "--target-norm", target, "--strict"]
    assert convert_main(argv + (["--conv", conv] if conv else [])) == 0
    return str(out)


def tiny_finetune(name, overrides, weights, output_dir, dataset):
    """The fine-tuning config with the backbone it names, on tiny images, 2 iterations."""
    cfg = build_config(name, list(overrides) + ["MODEL.WEIGHTS", weights])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.SMALLBN.CBN.BURNIN_ITERS = 1
    cfg.MODEL.SMALLBN.MABN.BUFFER_SIZE = 2
    s = cfg.MODEL.SMALLBN.MABN
    s.WARMUP_ITERS = s.FPN_WARMUP_ITERS = s.HEADS_WARMUP_ITERS = s.CLIP_WARMUP_ITERS = 1
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.RANDOM_FLIP = (64,), 96, "none"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 2, 2, (), 1
    cfg.SOLVER.CHECKPOINT_PERIOD = 10 ** 6
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def load_spied(trainer):
    """trainer.resume_or_load(resume=False), returning detectron2's incompatible keys."""
    seen = {}
    load_model = trainer.checkpointer._load_model

    def spy(checkpoint):
        seen["keys"] = load_model(checkpoint)
        return seen["keys"]

    trainer.checkpointer._load_model = spy
    trainer.resume_or_load(resume=False)
    return seen["keys"]


def frozen_tensors(model):
    """Every tensor that must not change: the stem's and res2's (FREEZE_AT 2) and every FrozenBN's."""
    bottom_up = model.backbone.bottom_up
    frozen = {f"{stage}.{k}": v.detach().clone() for stage in ("stem", "res2")
              for k, v in getattr(bottom_up, stage).state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            frozen.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return frozen


def current(model, key):
    bottom_up = dict(model.backbone.bottom_up.named_parameters()) | dict(model.backbone.bottom_up.named_buffers())
    return bottom_up.get(key) if key in bottom_up else model.state_dict()[key]


@pytest.mark.parametrize("case", sorted(FINETUNE))
def test_converted_checkpoint_loads_and_frozen_stages_stay_bit_identical(case, pretrained, detection_dataset,
                                                                          tmp_path):
    name, overrides, variant, target = FINETUNE[case]
    weights = converted(pretrained, tmp_path, variant, target)
    trainer = SmallBNTrainer(tiny_finetune(name, overrides, weights, tmp_path / "run", detection_dataset))
    incompatible = load_spied(trainer)
    backbone = "backbone.bottom_up."
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    model = trainer.model
    fresh = {k for m in model.backbone.bottom_up.modules() for k in getattr(type(m), "own_state", ())}
    missing = [k for k in incompatible.missing_keys if k.startswith(backbone)]
    assert all(k.rsplit(".", 1)[-1] in fresh for k in missing), missing  # only the layers' own fresh state
    pkl = torch.load(pretrained[variant]["checkpoint"], weights_only=True)
    assert torch.equal(model.backbone.bottom_up.res4[1].conv2.weight, pkl["layer3.1.conv2.weight"])
    before = frozen_tensors(model)
    assert any(".norm." in k for k in before)
    trainer.train()
    assert trainer.iter == 2  # finished (detectron2 counts max_iter at the end)
    changed = [k for k, v in before.items() if not torch.equal(v, current(model, k))]
    assert changed == []
    assert not torch.equal(pkl["layer4.1.conv2.weight"], model.backbone.bottom_up.res5[1].conv2.weight)  # trained


@pytest.mark.slow
def test_the_installed_command_converts_for_the_frozenbn_setting(pretrained, tmp_path):
    """The command pretrain prints (d2-smallbn-convert-weights) and its alias d2-smallbn-convert write the same."""
    command = pretrained["bn"]["convert"][0]["command"].split()
    assert command[0] == "d2-smallbn-convert-weights"
    written = {}
    for name in ("d2-smallbn-convert", "d2-smallbn-convert-weights"):
        out = tmp_path / name / "R18-frozenbn.pkl"
        out.parent.mkdir()
        proc = subprocess.run([*installed(name), pretrained["bn"]["checkpoint"], str(out), *command[3:]],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "every key was mapped" in proc.stdout and "weight transform: plain" in proc.stdout
        with open(out, "rb") as f:
            written[name] = pickle.load(f)
    alias, new = written["d2-smallbn-convert"]["model"], written["d2-smallbn-convert-weights"]["model"]
    assert sorted(alias) == sorted(new) and all(np.array_equal(alias[k], new[k]) for k in new)


# ---- backbones that do not fit ------------------------------------------------------------------------

# config, overrides, variant, conversion target (--conv as pretrain prints it), what the message must say
FROZENBN, BCNWS = "pretrained/mask_rcnn_R18_FPN_frozenbn_cbn.yaml", "pretrained/mask_rcnn_R18_FPN_bcnws_bcnws.yaml"
MABN, CBN = "pretrained/mask_rcnn_R18_FPN_mabn_mabn.yaml", "pretrained/mask_rcnn_R18_FPN_cbn_cbn.yaml"
MISMATCHES = {
    "depth": (FROZENBN, ["MODEL.RESNETS.DEPTH", "34"], "bn", "frozenbn",
              ["depth: the checkpoint holds a ResNet-18", "the config builds a ResNet-34", "MODEL.RESNETS.DEPTH 18"]),
    "gn_into_frozenbn": (FROZENBN, [], "gn", "gn",
                         ["norm type:", "FrozenBN (FrozenBatchNorm2d)", "MODEL.RESNETS.NORM one of GN,",
                          "were GN, which d2-smallbn-convert-weights cannot convert for frozenbn"]),
    "gnws_into_bcn": (BCNWS, [], "gnws", "gn",
                      ["norm type:", "BCN (BatchChannelNorm2d)",
                       "were GN, which d2-smallbn-convert-weights cannot convert for bcn"]),
    "mabn_weights_into_frozenbn": (FROZENBN, [], "centered_bn", "mabn",
                                   ["(1) norm type: stem.conv1.norm holds bias, running_sqmean, weight",
                                    "converted with --target-norm mabn x20", "FrozenBN (FrozenBatchNorm2d)",
                                    "model_final_torchvision.pth OUT.pkl --target-norm frozenbn",
                                    "(2) weight transform:", "Fix: MODEL.SMALLBN.CONV centered"]),
    "ws_into_plain_gn": (CBN, ["MODEL.RESNETS.NORM", "GN"], "gnws", "gn",
                         ["weight transform: the checkpoint's convs were trained with weight standardization (ws)",
                          "plain weights x20", "Fix: MODEL.SMALLBN.CONV ws"]),
    "centred_into_plain_syncbn": (MABN, ["MODEL.RESNETS.NORM", "naiveSyncBN"], "centered_bn", "syncbn",
                                  ["weight transform:", "weight centralization (centered)",
                                   "Fix: MODEL.SMALLBN.CONV centered"]),
    "plain_into_centred_mabn": (MABN, [], "bn", "mabn",
                                ["weight transform:", "plain weights (plain)", "Fix: MODEL.SMALLBN.CONV plain"]),
    "centred_into_cbn": (CBN, [], "centered_bn", "cbn", ["weight transform:", "CBN cannot have weight centralization"]),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_backbone_that_does_not_fit_stops_before_training(case, pretrained, detection_dataset, tmp_path):
    name, overrides, variant, target, expected = MISMATCHES[case]
    weights = converted(pretrained, tmp_path, variant, target)
    trainer = SmallBNTrainer(tiny_finetune(name, overrides, weights, tmp_path / "run", detection_dataset))
    untouched = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as error:
        trainer.resume_or_load(resume=False)
    message = str(error.value)
    assert message.startswith(f"{weights}: MODEL.WEIGHTS does not fit the config's backbone"), message
    for text in expected:
        assert text in message, (text, message)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in untouched.items())  # nothing loaded


def test_unknown_conv_type_is_not_checked_but_said(pretrained, detection_dataset, tmp_path, caplog):
    weights = converted(pretrained, tmp_path, "gnws", "gn", conv="")  # converted without --conv
    cfg = tiny_finetune("pretrained/mask_rcnn_R18_FPN_cbn_cbn.yaml", ["MODEL.RESNETS.NORM", "GN"], weights,
                        tmp_path / "run", detection_dataset)
    with caplog.at_level(logging.INFO, logger="d2_smallbn.engine.weights_check"):
        SmallBNTrainer(cfg).resume_or_load(resume=False)
    assert "converted without d2-smallbn-convert-weights --conv" in caplog.text


def test_other_checkpoints_get_the_depth_check_only(pretrained):
    """A detectron2 model-zoo file (BN folded into the affine, no statistics) passes the norm check it
    does not get; a ResNet-50's keys in it do not pass the depth check."""
    from detectron2.modeling import build_model

    cfg = build_config("pretrained/mask_rcnn_R18_FPN_frozenbn_cbn.yaml", ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    r18 = {k.replace("backbone.bottom_up.", ""): v for k, v in model.state_dict().items()
           if k.startswith("backbone.bottom_up.") and not k.endswith(("running_mean", "running_var"))}
    assert backbone_problems(model, {"model": r18, "__author__": "Caffe2"}) == []
    r50 = {f"res{s}.{b}.conv{j}.weight": torch.zeros(1) for s, n in zip(range(2, 6), (3, 4, 6, 3))
           for b in range(n) for j in (1, 2, 3)}
    problems = backbone_problems(model, {"model": {"stem.conv1.weight": torch.zeros(1), **r50}, "__author__": "x"})
    assert [p.what for p in problems] == ["depth"] and "a ResNet-50 (bottleneck blocks" in problems[0].detail


# ---- the fine-tuning study (python -m d2_smallbn.bench.study_pretrained) ------------------------------

def pretrain_dir(pretrained):
    return Path(pretrained["bn"]["checkpoint"]).parent.parent


@pytest.mark.slow
def test_every_study_row_fits_the_backbone_it_converts(pretrained, monkeypatch):
    """Each row of each table: its config and overrides build a model whose backbone the converted
    checkpoint fits (the check that stops a run before training finds nothing), and the row's norms
    are the ones the table names. The study's first conversion runs as its own process; the others run
    the same command line through the command's main in this process (saving a process start each)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_smallbn.bench import study_pretrained

    processes = []

    def run(cmd, check=False, **kwargs):
        assert cmd[1:3] == ["-m", "d2_smallbn.weights"], cmd
        if not processes:
            processes.append(subprocess.run(cmd, check=check, **kwargs))
            return processes[-1]
        code = convert_main(cmd[3:])
        if check and code:
            raise subprocess.CalledProcessError(code, cmd)
        return subprocess.CompletedProcess(cmd, code)

    monkeypatch.setattr(study_pretrained, "subprocess", SimpleNamespace(run=run))
    schedule, _ = study_pretrained.per_gpu_schedule(4, 1, 400)
    for name, make in study_pretrained.TABLES.items():
        for row_name, row in make(400).rows.items():
            weights = study_pretrained.converted(pretrain_dir(pretrained), row.weights)
            cfg = build_config(f"pretrained/{row.config}",
                               schedule + [str(x) for pair in row.overrides for x in pair])
            cfg.MODEL.DEVICE = "cpu"
            model = build_model(cfg)
            problems = backbone_problems(model, DetectionCheckpointer(model)._load_file(str(weights)))
            assert problems == [], (name, row_name, problems)
            heads = cfg.MODEL.FPN.NORM
            assert cfg.MODEL.ROI_BOX_HEAD.NORM == cfg.MODEL.ROI_MASK_HEAD.NORM == heads
            if name == "cbn_4a":
                assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
                assert heads == {"none": "", "bn": "BN", "syncbn": "naiveSyncBN", "gn": "GN"}.get(row_name, "CBN")
            else:
                assert cfg.MODEL.RESNETS.NORM == heads and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert len(processes) == 1 and processes[0].returncode == 0  # the study's own conversion process ran


def test_study_ablation_rows_change_only_their_key():
    from d2_smallbn.bench import study_pretrained

    rows = study_pretrained.TABLES["cbn_4a"](400).rows
    assert dict(rows["cbn_k1"].overrides) == {"MODEL.SMALLBN.CBN.WINDOW_SIZE": 1}
    assert dict(rows["cbn_naive"].overrides) == {"MODEL.SMALLBN.CBN.RHO": 0.0}
    assert dict(rows["cbn_burnin_25"].overrides) == {"MODEL.SMALLBN.CBN.BURNIN_ITERS": 100}
    assert dict(rows["cbn_burnin_lr_drop"].overrides) == {"MODEL.SMALLBN.CBN.BURNIN_ITERS": 320}  # the LR step
    schedule, rules = study_pretrained.per_gpu_schedule(4, 1, 400)
    assert rules["SOLVER.STEPS"]["value"] == (320,) and rules["MODEL.SMALLBN.CBN.WINDOW_SIZE"]["value"] == 16


def test_study_refuses_a_backbone_that_is_not_pretrained(tmp_path):
    from d2_smallbn.bench import study_pretrained

    with pytest.raises(SystemExit) as error:
        study_pretrained.main(["--pretrain-dir", str(tmp_path), "--settings", "cbn", "--seeds", "0"])
    assert "the 'bn' backbone is not pretrained" in str(error.value)
    assert f"python -m d2_smallbn.bench.pretrain --variants bn --out {tmp_path}" in str(error.value)


@pytest.mark.slow
def test_study_runs_a_row_on_processes_from_the_converted_backbone_and_reports(pretrained, tmp_path):
    from d2_smallbn.bench import study_pretrained

    out = tmp_path / "study"

    def argv(settings, *flags):
        return [*flags, "--pretrain-dir", str(pretrain_dir(pretrained)), "--out", str(out), "--gpus", "2",
                "--iters", "2", "--seeds", "0", "--settings", settings, "--data-root", str(tmp_path / "data"),
                "--num-train", "4", "--num-val", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
                "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]

    assert study_pretrained.main(argv("cbn_k1")) == 0
    run = out / "cbn_4a" / "runs" / "cbn_k1_seed0"
    config = build_config(str(run / "config.yaml"))
    assert config.MODEL.WEIGHTS == str(pretrain_dir(pretrained) / "bn" / "R18-frozenbn.pkl")
    assert config.MODEL.SMALLBN.CBN.WINDOW_SIZE == 1 and config.MODEL.FPN.NORM == "CBN"
    assert config.MODEL.RESNETS.NORM == "FrozenBN" and config.SOLVER.IMS_PER_BATCH == 2
    report = json.loads((out / "cbn_4a" / "study_accuracy.json").read_text())
    entry = report["settings"]["cbn_k1"]
    assert entry["processes"] == 2 and entry["seeds"]["0"]["statistics_error"]["records"] == 1
    assert report["rows"]["cbn"]["paper"]["row"].startswith("Faster R-CNN R50-FPN, frozen-BN backbone, CBN")
    markdown = (out / "cbn_4a" / "study_accuracy.md").read_text()
    assert "| cbn_k1 | 2 | 1 |" in markdown and "CBN Table 4: Faster R-CNN R50-FPN, frozen-BN backbone" in markdown
    (run / "results.json").rename(run / "results.json.kept")  # an interrupted run is not reported
    assert study_pretrained.main(argv("cbn_k1", "--report-only")) == 1
    (run / "results.json.kept").rename(run / "results.json")
    assert study_pretrained.main(argv("cbn_k1,bn", "--report-only")) == 0  # the unfinished row is named
    markdown = (out / "cbn_4a" / "study_accuracy.md").read_text()
    assert "| cbn_k1 | 2 | 1 |" in markdown and "Not finished (not in the table): bn seed 0" in markdown


def test_study_never_removes_a_stale_conversion_and_keeps_its_output_apart(pretrained, tmp_path, capsys):
    """A converted .pkl older than its checkpoint is refused, not replaced; --out may not hold --pretrain-dir."""
    import os

    from d2_smallbn.bench import study_pretrained

    folder = tmp_path / "pretrain"
    (folder / "bn").mkdir(parents=True)
    for name in ("pretrain.json", "model_final_torchvision.pth"):
        (folder / "bn" / name).write_bytes((pretrain_dir(pretrained) / "bn" / name).read_bytes())
    stale = folder / "bn" / "R18-frozenbn.pkl"
    stale.write_bytes(b"made from an earlier checkpoint")
    os.utime(stale, (1, 1))
    with pytest.raises(SystemExit, match="is older than the checkpoint it converts"):
        study_pretrained.converted(folder, study_pretrained.Weights("bn", "frozenbn", "plain"))
    assert stale.read_bytes() == b"made from an earlier checkpoint"
    with pytest.raises(SystemExit):
        study_pretrained.parse_args(["--pretrain-dir", str(folder), "--out", str(tmp_path)])
    assert "--out" in capsys.readouterr().err
