"""Measurements, each a command (``python -m d2_smallbn.bench.<name>``; the checkout's ``tools/`` scripts
call the same ``main``):

    model               model-level speed and memory against BN/GN/FrozenBN (``d2-smallbn-benchmark``)
    layers              layer-level speed and folding (``d2-smallbn-benchmark-layers``)
    study_accuracy      COCO AP of quickstart runs per norm and seed
    study_cbn_fidelity  how well CBN's compensated statistics track the true ones
    study_mabn_premise  MABN's premise: moving averages of the batch statistics' gradients
    pretrain            the pretrained regime's backbones: R18 classifiers of object crops (docs/pretrained.md)
    crops               pretrain's data: object crops of a generated smallbn_shapes set
    common              the shared helpers (summaries, device info, JSON, plots)
"""
