"""``SmallBNTrainer``: detectron2's DefaultTrainer plus our hook, an optimizer that treats our
norms' affine parameters as norm parameters, and COCO evaluation."""
import os

import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..data.loading import build_test_loader, build_train_loader
from ..layers import GroupNormPerGroupAffine
from ..modeling.norms import PerLevelNorm, SMALLBN_NORM_TYPES
from .checkpoint import explain_unreadable_checkpoint
from .hooks import SmallBNHook


def optimizer_param_groups(cfg, model):
    """detectron2's default param groups, with our norms' parameters under SOLVER.WEIGHT_DECAY_NORM
    like BN and GN (detectron2 recognizes only torch's norm classes)."""
    groups = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
    if cfg.SOLVER.WEIGHT_DECAY_NORM is None:
        return groups
    norm_types = SMALLBN_NORM_TYPES + (GroupNormPerGroupAffine,)
    ours = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    result = []
    for group in groups:
        mine = [p for p in group["params"] if id(p) in ours]
        rest = [p for p in group["params"] if id(p) not in ours]
        if rest:
            result.append({**group, "params": rest})
        if mine:
            result.append({**group, "params": mine, "weight_decay": cfg.SOLVER.WEIGHT_DECAY_NORM})
    return result


def build_optimizer(cfg, model):
    """SGD as detectron2 builds it, over ``optimizer_param_groups``."""
    sgd = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return sgd(optimizer_param_groups(cfg, model), lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
               nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


class SmallBNTrainer(DefaultTrainer):
    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def resume_or_load(self, resume=True):
        with explain_unreadable_checkpoint(self.checkpointer, self.cfg.MODEL.WEIGHTS, resume):
            super().resume_or_load(resume=resume)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_train_loader(cfg)  # an unreadable image or a dataset without annotations is named

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        dataset_size = None
        if self.cfg.MODEL.SMALLBN.CBN.BURNIN_EPOCHS > 0:
            dataset_size = len(get_detection_dataset_dicts(
                self.cfg.DATASETS.TRAIN, filter_empty=self.cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))
        return [SmallBNHook(self.cfg, dataset_size)] + super().build_hooks()
