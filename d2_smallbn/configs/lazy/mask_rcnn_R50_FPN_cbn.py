"""CBN paper (Yao et al., CVPR 2021), Table 5, Mask R50, CBN: the LazyConfig twin of
``mask_rcnn_R50_FPN_cbn.yaml`` (same setting; see that file's header for the reported AP and the
schedule conversion). Frozen-BN ImageNet R-50 backbone (stem and res2 frozen), CBN in the FPN and
both 4-conv heads, window 4, burn-in 3 epochs; 4 images per GPU x 4 GPUs = 16 per iteration, lr
0.02, 12 epochs = 87,950 iterations, lr /10 at 65,962 and 80,620; weight decay 1e-4 also on norms.

    d2-smallbn-train --config-file lazy/mask_rcnn_R50_FPN_cbn.py --num-gpus 4
"""
from .common.mask_rcnn_R50_FPN_4conv1fc import dataloader, model, multistep, optimizer, set_norms, train

set_norms(model, backbone="FrozenBN", heads="CBN", freeze_at=2)
model.backbone.bottom_up.stages.stride_in_1x1 = True
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 87950
dataloader.train.total_batch_size = 16
optimizer.lr = 0.02
optimizer.params.weight_decay_norm = 1e-4
lr_multiplier = multistep(87950, (65962, 80620))
smallbn = {"PAPER_IMS_PER_GPU": 4, "CBN": {"WINDOW_SIZE": 4, "BURNIN_EPOCHS": 3.0}}
