"""LazyConfig and OmegaConf users: detectron2's own Mask R-CNN LazyConfig with norm="CBN" strings
trains and evaluates through the lazy entry point (and after the one documented call in a loop of
the user's own), an unconverted model names that call, and ``build_model(OmegaConf.create(cfg.dump()))``
works with and without our norms after ``import d2_smallbn``."""
import math

import detectron2.data.transforms as T
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

import d2_smallbn
from tiny_detector import tiny_cfg
from d2_smallbn.engine import SmallBNTrainer
from d2_smallbn.engine.lazy import do_train
from d2_smallbn.layers import CBNConv2d, CrossIterationBatchNorm2d, NormStateDriver
from d2_smallbn.model_zoo import detectron2_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def users_lazy_model(norm):
    """detectron2's common/models/mask_rcnn_fpn.py with every norm set to ``norm``, shrunk to R18
    and 32 channels (what a user writes: strings only)."""
    model = detectron2_config("common/models/mask_rcnn_fpn.py").model
    bottom_up = model.backbone.bottom_up
    bottom_up.stem.norm = bottom_up.stages.norm = model.backbone.norm = norm
    model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = norm
    bottom_up.stages.depth = 18
    del bottom_up.stages.stride_in_1x1  # R18's basic blocks have no such argument
    model.backbone.out_channels = 32
    rpn = model.proposal_generator
    rpn.head.in_channels, rpn.batch_size_per_image = 32, 64
    rpn.pre_nms_topk, rpn.post_nms_topk = (200, 100), (64, 50)
    heads = model.roi_heads
    heads.num_classes, heads.batch_size_per_image = 2, 64
    heads.box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
    heads.box_head.conv_dims, heads.box_head.fc_dims = [32] * 4, [64]
    heads.box_predictor.input_shape = ShapeSpec(channels=64)
    heads.mask_head.input_shape = ShapeSpec(channels=32, width=14, height=14)
    heads.mask_head.conv_dims = [32] * 5
    return model


def users_lazy_config(norm, dataset, output_dir):
    """A complete LazyConfig in detectron2's layout (no ``smallbn`` node: the defaults)."""
    cfg = OmegaConf.create()
    cfg.model = users_lazy_model(norm)
    resize = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=128)]
    cfg.dataloader = OmegaConf.create()
    cfg.dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=dataset),
        mapper=L(DatasetMapper)(is_train=True, augmentations=resize, image_format="BGR", use_instance_mask=True),
        total_batch_size=2, num_workers=0)
    cfg.dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=dataset, filter_empty=False),
        mapper=L(DatasetMapper)(is_train=False, augmentations=resize, image_format="BGR"), num_workers=0)
    cfg.dataloader.evaluator = L(COCOEvaluator)(dataset_name=dataset, output_dir=output_dir)
    cfg.optimizer = detectron2_config("common/optim.py").SGD
    cfg.optimizer.lr = 0.01
    cfg.lr_multiplier = detectron2_config("common/coco_schedule.py").lr_multiplier_1x
    cfg.train = detectron2_config("common/train.py").train
    cfg.train.update(output_dir=output_dir, device="cpu", max_iter=2, eval_period=0, log_period=1)
    cfg.train.checkpointer.period = 10 ** 6
    return cfg


def test_unconverted_lazy_model_names_the_call_that_fixes_it():
    model = instantiate(users_lazy_model("CBN"))
    model.eval()
    with pytest.raises(RuntimeError, match=r"d2_smallbn\.convert_model\(model, settings\)"):
        model([{"image": torch.rand(3, 64, 64) * 255}])


def test_lazy_config_with_norm_strings_trains_two_iterations_and_evaluates(tiny_dataset, tmp_path):
    cfg = users_lazy_config("CBN", "smallbn_tiny", str(tmp_path))
    torch.manual_seed(0)
    trainer = do_train(cfg)  # the lazy entry point: instantiate, convert once, hook, train, evaluate
    model = trainer.model
    convs = [m for m in model.modules() if isinstance(m, CBNConv2d)]
    assert len(convs) == 20 + 8 + 4 + 4  # R18 (stem, 16, 3 shortcuts), FPN, box and mask heads
    assert all(isinstance(c.norm, CrossIterationBatchNorm2d) and c.norm.window_size == 4 for c in convs)
    assert {int(c.norm.num_steps) for c in convs} == {2}  # driven by the hook, once per iteration
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert "bbox/AP" in trainer.storage.latest() and "segm/AP" in trainer.storage.latest()


def test_users_own_loop_trains_after_the_one_documented_call(tiny_dataset):
    cfg = users_lazy_config("CBN", "smallbn_tiny", "/tmp/unused")
    model = d2_smallbn.convert_model(instantiate(cfg.model), {"CBN": {"WINDOW_SIZE": 2}})
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    driver = NormStateDriver(model, optimizer)
    data = iter(instantiate(cfg.dataloader.train))
    with EventStorage(0):  # detectron2's models log to an event storage in training
        for it in range(2):
            driver.before_step(it)
            loss = sum(model(next(data)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert math.isfinite(float(loss))
    norms = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert norms and all(n.window_size == 2 and int(n.num_stored) == 2 for n in norms)


class OmegaConfBuilt:
    """A trainer whose model comes from ``build_model(OmegaConf.create(cfg.dump()))``."""

    @classmethod
    def build_model(cls, cfg):
        from detectron2.modeling import build_model

        return build_model(OmegaConf.create(cfg.dump()))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=cfg.OUTPUT_DIR)


@pytest.mark.parametrize("norm", ["GN", "CBN"])
def test_build_model_from_omegaconf_trains_and_evaluates(norm, tiny_dataset, tmp_path):
    cfg = tiny_cfg(backbone=norm, fpn=norm, box=norm, mask=norm, output_dir=str(tmp_path), iters=2)
    cfg.DATASETS.TEST = ("smallbn_tiny",)
    if norm == "GN":  # a plain detectron2 config: no MODEL.SMALLBN, stock backbone, stock trainer
        cfg.MODEL.pop("SMALLBN")
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        base = DefaultTrainer
    else:
        base = SmallBNTrainer
    trainer = type("Trainer", (OmegaConfBuilt, base), {})(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model = trainer.model
    if norm == "CBN":
        convs = [m for m in model.modules() if isinstance(m, CBNConv2d)]
        assert len(convs) == 36 and all(c.norm.window_size == 3 for c in convs)  # tiny_cfg's window
    else:
        assert not list(d2_smallbn.modeling.smallbn_norms(model))
        assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 36
    results = trainer.test(cfg, model)
    assert set(results) == {"bbox", "segm"} and all(math.isfinite(v) or math.isnan(v)
                                                     for v in results["bbox"].values())


def test_wrong_setting_types_fail_when_the_model_is_built_naming_the_key():
    model = users_lazy_model("CBN")
    with pytest.raises(ValueError, match=r"MODEL\.SMALLBN\.CBN\.WINDOW_SIZE = '4' is invalid"):
        d2_smallbn.convert_model(instantiate(model), {"CBN": {"WINDOW_SIZE": "4"}})
    with pytest.raises(ValueError, match=r"MODEL\.SMALLBN\.CBN\.WINDOW is not a setting.*WINDOW_SIZE"):
        d2_smallbn.convert_model(instantiate(model), {"CBN": {"WINDOW": 4}})
    lazy = OmegaConf.create({"model": model, "smallbn": {"MABN": {"BUFER_SIZE": 4}}})
    with pytest.raises(ValueError, match=r"MODEL\.SMALLBN\.MABN\.BUFER_SIZE is not a setting"):
        d2_smallbn.convert_model(instantiate(lazy.model), lazy)
    cfg = tiny_cfg(backbone="CBN")
    cfg.MODEL.SMALLBN.CBN.WINDOW_SIZE = "4"  # yacs lets a str through merge_from_list-free edits
    from detectron2.modeling import build_model
    with pytest.raises(ValueError, match=r"MODEL\.SMALLBN\.CBN\.WINDOW_SIZE"):
        build_model(OmegaConf.create(cfg.dump()))


def test_paper_batch_warning_names_the_keys_of_the_config_language(caplog):
    import logging

    from d2_smallbn.engine import SmallBNHook, check_batch_per_gpu

    lazy = OmegaConf.create({"model": {}, "dataloader": {"train": {"total_batch_size": 8}},
                             "smallbn": {"PAPER_IMS_PER_GPU": 2}})  # a LazyConfig root's shape
    yacs = tiny_cfg(backbone="CBN", iters=1)
    yacs.SOLVER.IMS_PER_BATCH = 8
    with caplog.at_level(logging.WARNING, logger="d2_smallbn"):
        assert not check_batch_per_gpu(2, 8, 2, **SmallBNHook(lazy, ims_per_batch=8).batch_keys)
        lazy_text, _ = caplog.text, caplog.clear()
        assert not check_batch_per_gpu(2, 8, 2, **SmallBNHook(yacs).batch_keys)
    assert "dataloader.train.total_batch_size / world size = 8 / 2 = 4" in lazy_text
    assert "set smallbn.PAPER_IMS_PER_GPU=0 to silence" in lazy_text
    assert "SOLVER.IMS_PER_BATCH / world size = 8 / 2 = 4" in caplog.text
    assert "set MODEL.SMALLBN.PAPER_IMS_PER_GPU 0 to silence" in caplog.text
    assert check_batch_per_gpu(2, 8, 4)  # 2 per process: no warning
