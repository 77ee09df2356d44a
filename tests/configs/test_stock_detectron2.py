"""This project's LazyConfigs with detectron2's own tools (issue 20): a plain ``instantiate(cfg.model)``
gives the converted model, and detectron2's stock ``tools/lazyconfig_train_net.py`` trains it
unchanged (the norms count their own iterations; BCN's rate stays at the base LR). Baselines without
our norms (GN, SyncBN; YAML and LazyConfig) train without the "nothing to convert" warning."""
import argparse
import copy
import json
import math
import warnings

import detectron2.data.transforms as T
import detectron2.modeling
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate

import d2_smallbn
from d2_smallbn import model_zoo
from d2_smallbn.engine import SmallBNTrainer
from d2_smallbn.engine.lazy import do_train as smallbn_do_train
from d2_smallbn.layers import BatchChannelNorm2d, CrossIterationBatchNorm2d
from d2_smallbn.model_zoo import detectron2_config
from d2_smallbn.modeling import check_converted, smallbn_norms
from test_configs import (PY_CONFIGS, PY_TWINS, check_settings, configs, structure, tiny,  # noqa: F401
                          tiny_dataset, tiny_lazy, trainable, yaml_settings)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def trainable_lazy(name, dataset, output_dir):
    """LazyConfig ``name`` at tiny size on the tiny dataset: 2 iterations, no COCO evaluation."""
    cfg = tiny_lazy(model_zoo.get_config(name))
    train = cfg.dataloader.train
    train.dataset.names = dataset
    train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=96)]
    train.total_batch_size, train.num_workers = 2, 0
    del cfg.dataloader.evaluator
    cfg.train.update(output_dir=output_dir, init_checkpoint="", max_iter=2, eval_period=0, log_period=1)
    cfg.train.checkpointer.period = 10 ** 6
    return cfg


def nothing_to_convert(caught):
    return [str(w.message) for w in caught if "nothing to convert" in str(w.message)]


@pytest.mark.parametrize("name", PY_CONFIGS)
def test_plain_instantiate_gives_the_converted_model_of_the_build_path(name, configs, tmp_path):
    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(model_zoo.get_config(name), saved)  # as detectron2's default_setup writes it
    twin = tiny(configs(PY_TWINS[name]))
    torch.manual_seed(0)
    reference = structure(detectron2.modeling.build_model(twin))
    for how in (model_zoo.get_config_file(name), saved):
        cfg = tiny_lazy(LazyConfig.load(how))
        model = instantiate(cfg.model)
        check_converted(model)
        assert check_settings(model, yaml_settings(twin), twin.SOLVER.BASE_LR), how
        assert structure(model) == reference, how
        assert d2_smallbn.convert_model(model, cfg) is model and structure(model) == reference, how


def test_overrides_of_the_settings_reach_the_instantiated_model():
    cfg = tiny_lazy(model_zoo.get_config("lazy/mask_rcnn_R50_FPN_bcnws_bcnws_2x.py"))
    cfg = LazyConfig.apply_overrides(cfg, ["smallbn.BCN.NUM_GROUPS=8", "optimizer.lr=0.005"])
    norms = [m for m in instantiate(cfg.model).modules() if isinstance(m, BatchChannelNorm2d)]
    assert norms and all(n.num_groups == 8 and float(n.update_rate) == pytest.approx(0.005) for n in norms)


@pytest.mark.parametrize("name", PY_CONFIGS)
@pytest.mark.slow
def test_detectron2s_stock_lazyconfig_train_net_trains_our_config(name, tiny_dataset, tmp_path):
    stock = pytest.importorskip("tools.lazyconfig_train_net", reason="detectron2's tools package is not installed")
    cfg = trainable_lazy(name, tiny_dataset, str(tmp_path))
    stock.do_train(argparse.Namespace(resume=False), cfg)  # instantiate(cfg.model), SimpleTrainer, stock hooks
    with open(tmp_path / "metrics.json") as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    model = instantiate(cfg.model)  # as the script's --eval-only: the checkpoint it wrote fits the model
    DetectionCheckpointer(model).load(str(tmp_path / "model_final.pth"))
    norms = [m for m in smallbn_norms(model) if not m.frozen]
    assert norms
    for norm in norms:
        if hasattr(norm, "num_steps"):  # not driven by a hook: each counted its own 2 training steps
            assert int(norm.num_steps) == 2
        if isinstance(norm, BatchChannelNorm2d):  # no hook: the rate stays at the base LR (no warmup, no decay)
            assert float(norm.update_rate) == pytest.approx(cfg.optimizer.lr)
        if isinstance(norm, CrossIterationBatchNorm2d):  # no hook: BURNIN_EPOCHS is not applied
            assert norm.burnin_iters == 0 and int(norm.num_stored) == 2
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", ["bcn/mask_rcnn_R50_FPN_gn_gn_2x.yaml", "cbn/mask_rcnn_R50_FPN_frozenbn_syncbn_1x.yaml"])
def test_a_yaml_baseline_trains_without_the_nothing_to_convert_warning(name, configs, tiny_dataset, tmp_path):
    cfg = trainable(configs(name), tiny_dataset, str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SmallBNTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER and not smallbn_norms(trainer.model)
    assert not nothing_to_convert(caught)


def test_a_lazy_baseline_trains_without_the_nothing_to_convert_warning(tiny_dataset, tmp_path):
    ours = trainable_lazy("lazy/mask_rcnn_R50_FPN_cbn.py", tiny_dataset, str(tmp_path / "ours"))
    heads = ours.model.roi_heads
    ours.model.backbone.norm = heads.box_head.conv_norm = heads.mask_head.conv_norm = "GN"  # FrozenBN + GN
    ours.smallbn = {}
    users = copy.deepcopy(ours)  # the same model in a user's config: detectron2's node, no conversion in it
    users.model = detectron2_config("common/models/mask_rcnn_fpn.py").model
    users = tiny_lazy(users)
    heads = users.model.roi_heads
    users.model.backbone.norm = heads.box_head.conv_norm = heads.mask_head.conv_norm = "GN"
    users.train.output_dir = str(tmp_path / "users")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not smallbn_norms(instantiate(ours.model))
        for cfg in (ours, users):
            trainer = smallbn_do_train(cfg)  # what d2-smallbn-train runs
            assert trainer.iter == 2 and not smallbn_norms(trainer.model)
    assert not nothing_to_convert(caught)
