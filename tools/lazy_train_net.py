#!/usr/bin/env python
"""Train or evaluate a LazyConfig (.py) model with detectron2's launcher and d2_smallbn's hook.

    python tools/lazy_train_net.py --config-file lazy/mask_rcnn_R50_FPN_cbn.py --num-gpus 4
    python tools/lazy_train_net.py --config-file my_config.py train.max_iter=1000 smallbn.CBN.WINDOW_SIZE=8
    python tools/lazy_train_net.py --config-file ... --eval-only train.init_checkpoint=model.pth

Config files are paths or names under configs/. Overrides are ``key=value`` (LazyConfig style).
"""
from detectron2.engine import default_argument_parser, launch

from d2_smallbn.engine.lazy import main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
