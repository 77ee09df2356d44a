"""Training with the trainer and hook: per-iteration layer state, exact resume, faults."""
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.engine import HookBase

from generated_images import make_images
from tiny_detector import register, tiny_cfg
from d2_smallbn.engine import SmallBNTrainer
from d2_smallbn.layers import BatchChannelNorm2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from d2_smallbn.layers._common import StepCounter


class IterationIndexedData:
    """Batch i is always the same, whatever iteration training (re)starts at."""

    def __init__(self, batches, trainer):
        self.batches, self.trainer = batches, trainer

    def __iter__(self):
        while True:
            yield self.batches[self.trainer.iter % len(self.batches)]


class SeedEachStep(HookBase):
    """detectron2 does not checkpoint the RNG (RoI sampling uses it); seed per iteration instead."""

    def before_step(self):
        torch.manual_seed(1000 + self.trainer.iter)


class Recorder(HookBase):
    def __init__(self):
        self.rates, self.steps, self.losses = [], [], []

    def before_step(self):
        model = self.trainer.model
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        self.rates.append((lr, [float(m.update_rate) for m in model.modules() if isinstance(m, BatchChannelNorm2d)]))

    def after_step(self):
        model = self.trainer.model
        self.steps.append({int(m.num_steps) for m in model.modules() if isinstance(m, StepCounter) and not m.frozen})
        self.losses.append(self.trainer.storage.history("total_loss").latest())


def make_trainer(cfg, records):
    trainer = SmallBNTrainer(cfg)
    mapper = DatasetMapper(cfg, is_train=True)
    batches = [[mapper(dict(r)) for r in records[i:i + 2]] for i in range(0, len(records), 2)]
    trainer._trainer.data_loader = IterationIndexedData(batches, trainer)
    recorder = Recorder()
    trainer.register_hooks([SeedEachStep(), recorder])
    return trainer, recorder


def test_hook_drives_iterations_and_bcn_rate_follows_the_lr_through_warmup(tiny_dataset, tmp_path):
    cfg = tiny_cfg(backbone="MABN", fpn="CBN", box="BCN", mask="BCN", iters=5, output_dir=str(tmp_path))
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 3, (4,)
    trainer, rec = make_trainer(cfg, tiny_dataset)
    trainer.resume_or_load(resume=False)
    trainer.train()
    lrs = [lr for lr, _ in rec.rates]
    assert len(set(lrs)) == 5  # warmup ramps, then the step decays
    for lr, rates in rec.rates:
        assert rates and all(r == pytest.approx(lr) for r in rates)
    assert rec.steps == [{i + 1} for i in range(5)]


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
# Tolerances of the resumed run against the uninterrupted one: (first resumed step's losses, later losses
# and final state). On CPU the run is deterministic. On CUDA the forward from an identical state is too,
# but backward kernels with atomic adds (RoIAlign's, cuDNN's weight gradients) sum in varying order,
# so later steps differ in the last bits of fp16/fp32 sums, which three SGD steps do not amplify past 1e-3.
RESUME_TOLERANCE = {"cpu": (1e-5, 1e-5), "cuda": (1e-5, 1e-3)}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("norm", ["CBN", "MABN", "BCN", "GN", "BN"])
def test_resume_continues_exactly_as_an_uninterrupted_run(norm, device, tiny_dataset, tmp_path, monkeypatch):
    """The quickstart model's shape (R18-FPN, 4conv1fc, tiny widths); with AMP (SOLVER.AMP.ENABLED) on CUDA."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def config(out):
        cfg = tiny_cfg(backbone=norm, fpn=norm, box=norm, mask=norm, iters=6, output_dir=str(out))
        cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 3, 2, (4,)
        cfg.SOLVER.MOMENTUM = 0.9
        cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED = device, device == "cuda"
        return cfg

    straight, rec_a = make_trainer(config(tmp_path / "a"), tiny_dataset)
    straight.resume_or_load(resume=False)
    straight.train()
    resumed, rec_b = make_trainer(config(tmp_path / "b"), tiny_dataset)
    resumed.checkpointer.load(str(tmp_path / "a" / "model_0000002.pth"))  # model, optimizer, scheduler, iter
    resumed.start_iter = resumed.iter + 1
    assert resumed.start_iter == 3
    resumed.train()
    first, rest = RESUME_TOLERANCE[device]
    assert all(np.isfinite(rec_a.losses))
    assert rec_b.losses[0] == pytest.approx(rec_a.losses[3], rel=first)
    assert rec_b.losses == pytest.approx(rec_a.losses[3:], rel=rest)
    state_a, state_b = straight.model.state_dict(), resumed.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=rest, atol=rest / 10, msg=key)


def test_no_foreground_rois_and_constant_images_keep_training_finite(tmp_path):
    records = make_images(str(tmp_path), count=2)
    records[0]["annotations"] = []  # zero foreground: the mask head gets no RoIs
    from PIL import Image
    Image.fromarray(np.full((96, 128, 3), 77, np.uint8)).save(records[1]["file_name"])  # constant image
    register("smallbn_faults", records)
    cfg = tiny_cfg(backbone="MABN", fpn="CBN", box="BCN", mask="CBN", dataset="smallbn_faults", iters=4,
                   output_dir=str(tmp_path / "out"))
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    trainer, rec = make_trainer(cfg, records)
    trainer._trainer.data_loader.batches = [[b[0]] for b in trainer._trainer.data_loader.batches] + \
        [[DatasetMapper(cfg, is_train=True)(dict(records[1]))]]
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert all(np.isfinite(rec.losses))
    trainer.checkpointer.save("faults")
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "faults.pth"))["model"]
    for key, value in saved.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_burnin_epochs_are_converted_with_the_dataset_size(tiny_dataset, tmp_path):
    cfg = tiny_cfg(backbone="FrozenBN", fpn="CBN", iters=1, output_dir=str(tmp_path))
    cfg.MODEL.SMALLBN.CBN.BURNIN_EPOCHS = 3.0  # 3 epochs x 4 images / 2 per iteration
    trainer, _ = make_trainer(cfg, tiny_dataset)
    trainer.train()
    assert {m.burnin_iters for m in trainer.model.modules() if isinstance(m, CrossIterationBatchNorm2d)} == {6}


def test_warns_when_images_per_process_differ_from_the_paper(tiny_dataset, tmp_path, caplog):
    cfg = tiny_cfg(backbone="MABN", iters=1, output_dir=str(tmp_path))
    cfg.MODEL.SMALLBN.PAPER_IMS_PER_GPU = 4
    trainer, _ = make_trainer(cfg, tiny_dataset)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "reproduces a paper setting with 4 images per GPU" in caplog.text
    assert any(isinstance(m, MovingAverageBatchNorm2d) for m in trainer.model.modules())


@pytest.mark.parametrize("fpn", ["CBN", "MABN", "BCN"])
def test_precise_bn_is_refused_for_the_norms_it_would_skip(fpn, tiny_dataset, tmp_path):
    cfg = tiny_cfg(backbone="FrozenBN", fpn=fpn, iters=1, output_dir=str(tmp_path))
    cfg.TEST.PRECISE_BN.ENABLED = True
    trainer, rec = make_trainer(cfg, tiny_dataset)
    with pytest.raises(ValueError, match=rf"TEST.PRECISE_BN.ENABLED.*trains 8 {fpn} norm layers.*Fix: set "
                                         r"TEST.PRECISE_BN.ENABLED False"):
        trainer.train()
    assert rec.losses == []  # refused before the first step


def test_precise_bn_stays_available_to_a_torch_bn_model(tiny_dataset, tmp_path):
    cfg = tiny_cfg(backbone="FrozenBN", fpn="BN", iters=1, output_dir=str(tmp_path))
    cfg.TEST.PRECISE_BN.ENABLED = True
    trainer, rec = make_trainer(cfg, tiny_dataset)
    trainer.train()
    assert len(rec.losses) == 1
    assert any(type(h).__name__ == "PreciseBN" for h in trainer._hooks)


def test_fixed_bcn_update_rate_is_kept_through_warmup(tiny_dataset, tmp_path):
    cfg = tiny_cfg(backbone="MABN", box="BCN", iters=2, output_dir=str(tmp_path))
    cfg.MODEL.SMALLBN.BCN.UPDATE_RATE_MODE, cfg.MODEL.SMALLBN.BCN.UPDATE_RATE = "fixed", 0.05
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 1, ()
    trainer, rec = make_trainer(cfg, tiny_dataset)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len({lr for lr, _ in rec.rates}) == 2  # the learning rate moved ...
    for _, rates in rec.rates:  # ... the update rate did not
        assert rates and all(r == pytest.approx(0.05) for r in rates)


def test_training_on_a_truncated_image_names_the_file(tmp_path):
    from PIL import Image

    from d2_smallbn.data import DatasetError

    records = make_images(str(tmp_path), count=2)
    damaged = tmp_path / "damaged.jpg"
    Image.open(records[1]["file_name"]).convert("RGB").save(damaged, format="JPEG")
    damaged.write_bytes(damaged.read_bytes()[:700])  # the header survives, the image data does not
    records[1]["file_name"] = str(damaged)
    register("smallbn_truncated", records)
    cfg = tiny_cfg(backbone="MABN", dataset="smallbn_truncated", iters=2, output_dir=str(tmp_path / "out"))
    trainer = SmallBNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(DatasetError, match="truncated") as info:
        trainer.train()  # both images are in the first batch
    assert str(damaged) in str(info.value) and "Fix:" in str(info.value)


def test_a_training_set_without_annotations_is_explained(tmp_path):
    from d2_smallbn.data import DatasetError

    records = make_images(str(tmp_path), count=2)
    for r in records:
        r["annotations"] = []
    register("smallbn_unannotated", records)
    cfg = tiny_cfg(backbone="MABN", dataset="smallbn_unannotated", output_dir=str(tmp_path / "out"))
    with pytest.raises(DatasetError) as info:
        SmallBNTrainer(cfg)
    message = str(info.value)
    assert "'smallbn_unannotated': 2 images, 0 annotations" in message
    assert "FILTER_EMPTY_ANNOTATIONS" in message and "Fix:" in message


def test_resume_from_a_truncated_last_checkpoint_names_it_and_the_earlier_ones(tiny_dataset, tmp_path):
    from d2_smallbn.engine.checkpoint import CheckpointError

    cfg = tiny_cfg(backbone="MABN", iters=2, output_dir=str(tmp_path))
    trainer = SmallBNTrainer(cfg)
    for iteration, name in ((0, "model_0000000"), (1, "model_0000001"), (1, "model_final")):  # as training saves
        trainer.iter = iteration
        trainer.checkpointer.save(name)
    final = tmp_path / "model_final.pth"
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # killed while saving
    with pytest.raises(CheckpointError) as info:
        SmallBNTrainer(cfg).resume_or_load(resume=True)
    message = str(info.value)
    assert message.startswith(f"{final}: the last checkpoint") and "truncated" in message
    assert "echo model_0000001.pth > " + str(tmp_path / "last_checkpoint") in message
    assert "model_0000001.pth, model_0000000.pth" in message

    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")  # the fix the message gives
    resumed = SmallBNTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
