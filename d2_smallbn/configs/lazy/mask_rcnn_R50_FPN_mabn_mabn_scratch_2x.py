"""MABN paper (Yan et al., ICLR 2020), appendix B.3, Table 5, MABN row: the LazyConfig twin of
``mabn/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.yaml`` (see its header for the reported AP). From
scratch (He init, nothing frozen, stride in the 1x1 conv), MABN with weight-centralized convs in
the backbone, FPN and both heads (buffer m = 32, heads on batch statistics for 10,000 iterations);
2 images per GPU x 8 GPUs = 16 per iteration, lr 0.02, 2x = 180,000 iterations, lr /10 at 120,000
and 160,000.

    d2-smallbn-train --config-file lazy/mask_rcnn_R50_FPN_mabn_mabn_scratch_2x.py --num-gpus 8
"""
from .common.mask_rcnn_R50_FPN_4conv1fc import dataloader, model, multistep, optimizer, set_norms, train

set_norms(model, backbone="MABN", heads="MABN", freeze_at=0)
model.backbone.bottom_up.stages.stride_in_1x1 = True
train.init_checkpoint = ""
train.max_iter = 180000
dataloader.train.total_batch_size = 16
optimizer.lr = 0.02
lr_multiplier = multistep(180000, (120000, 160000))
smallbn = {"INIT": "he", "PAPER_IMS_PER_GPU": 2,
           "MABN": {"MOMENTUM": 0.98, "BUFFER_SIZE": 32, "HEADS_WARMUP_ITERS": 10000}}
