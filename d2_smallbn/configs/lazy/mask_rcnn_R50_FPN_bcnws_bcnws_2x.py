"""BCN+WS paper (Qiao et al., 2019), Table 9, Mask R50, BCN+WS: the LazyConfig twin of
``bcn/mask_rcnn_R50_FPN_bcnws_bcnws_2x.yaml`` (see its header for the reported AP and the
weights). BCN (32 groups, update rate = the learning rate) with WS convs in the backbone, FPN and
both heads, from the authors' BCN+WS ImageNet R-50 (stem and res2 frozen, stride in the 3x3 conv,
RGB input with ImageNet mean/std); 2 images per GPU x 4 GPUs = 8 per iteration, lr 0.01,
360,000 iterations, lr /10 at 300,000 and 340,000.

    d2-smallbn-train --config-file lazy/mask_rcnn_R50_FPN_bcnws_bcnws_2x.py --num-gpus 4
"""
from .common.mask_rcnn_R50_FPN_4conv1fc import dataloader, model, multistep, optimizer, set_norms, train

set_norms(model, backbone="BCN", heads="BCN", freeze_at=2)
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.input_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"
train.init_checkpoint = "weights/R-50-BCN-WS.pkl"
train.max_iter = 360000
dataloader.train.total_batch_size = 8
optimizer.lr = 0.01
lr_multiplier = multistep(360000, (300000, 340000))
smallbn = {"CONV": "auto", "PAPER_IMS_PER_GPU": 2,
           "BCN": {"NUM_GROUPS": 32, "EPS": 1e-5, "UPDATE_RATE_MODE": "lr"}, "WS": {"MODE": "std", "EPS": 1e-5}}
