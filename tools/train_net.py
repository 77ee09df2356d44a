#!/usr/bin/env python
"""Train or evaluate a d2_smallbn model with detectron2's launcher.

    python tools/train_net.py --config-file configs/mask_rcnn_R50_FPN_cbn.yaml --num-gpus 4
    python tools/train_net.py --config-file mask_rcnn_R50_FPN_cbn.yaml --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file ... --resume

Config files are paths or names under configs/ (the package's copy), so this works from any
directory. Training adds d2_smallbn's hook and COCO evaluation (box and mask).
"""
from detectron2.engine import default_argument_parser, launch

from d2_smallbn.engine.defaults import main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
