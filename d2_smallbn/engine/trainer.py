"""``SmallBNTrainer``: detectron2's DefaultTrainer plus our hook, an optimizer that treats our
norms' affine parameters as norm parameters, and COCO evaluation."""
import os

import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..data.loading import build_test_loader, build_train_loader
from ..norms import needs_dataset_size, norm_types
from .checkpoint import explain_unreadable_checkpoint
from .ddp import cpu_safe_ddp
from .hooks import SmallBNHook, model_settings
from .weights_check import checked_initial_weights


def norm_param_groups(groups, model, weight_decay_norm):
    """detectron2's param groups with our norms' parameters (the table's layer classes, and any module
    whose class sets ``norm_parameters``, such as BCN's folded group part) under ``weight_decay_norm``
    like BN and GN: detectron2 recognizes only torch's norm classes."""
    ours = {id(p) for m in model.modules() if isinstance(m, norm_types()) or getattr(m, "norm_parameters", False)
            for p in m.parameters(recurse=False)}
    result = []
    for group in groups:
        mine = [p for p in group["params"] if id(p) in ours]
        rest = [p for p in group["params"] if id(p) not in ours]
        if rest:
            result.append({**group, "params": rest})
        if mine:
            result.append({**group, "params": mine, "weight_decay": weight_decay_norm})
    return result


def get_optimizer_params(model, weight_decay_norm=None, **kwargs):
    """``detectron2.solver.get_default_optimizer_params`` (same arguments) with our norms counted as
    norms; for LazyConfigs (``optimizer.params._target_``)."""
    groups = get_default_optimizer_params(model, weight_decay_norm=weight_decay_norm, **kwargs)
    return groups if weight_decay_norm is None else norm_param_groups(groups, model, weight_decay_norm)


def optimizer_param_groups(cfg, model):
    """``get_optimizer_params`` with a yacs config's SOLVER values."""
    return get_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)


def build_optimizer(cfg, model):
    """SGD as detectron2 builds it, over ``optimizer_param_groups``."""
    sgd = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return sgd(optimizer_param_groups(cfg, model), lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
               nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


class SmallBNTrainer(DefaultTrainer):
    def __init__(self, cfg):
        with cpu_safe_ddp():
            super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def resume_or_load(self, resume=True):
        weights = self.cfg.MODEL.WEIGHTS
        with explain_unreadable_checkpoint(self.checkpointer, weights, resume), \
                checked_initial_weights(self.checkpointer, weights, resume):  # a backbone that does not fit stops
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
        if needs_dataset_size(model_settings(self.model, self.cfg)):
            dataset_size = len(get_detection_dataset_dicts(
                self.cfg.DATASETS.TRAIN, filter_empty=self.cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))
        return [SmallBNHook(self.cfg, dataset_size=dataset_size)] + super().build_hooks()
