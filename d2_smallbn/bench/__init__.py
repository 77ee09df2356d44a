"""Measurements, each a command (``python -m d2_smallbn.bench.<name>``; the checkout's ``tools/`` scripts
call the same ``main``):

    model               model-level speed and memory against BN/GN/FrozenBN (``d2-smallbn-benchmark``)
    layers              layer-level speed and folding (``d2-smallbn-benchmark-layers``)
    study_accuracy      COCO AP of quickstart runs per norm and seed
    study_cbn_fidelity  how well CBN's compensated statistics track the true ones
    study_mabn_premise  MABN's premise: moving averages of the batch statistics' gradients
    pretrain            the pretrained regime's backbones: R18 classifiers of object crops (docs/pretrained.md)
    crops               pretrain's data: object crops of a generated smallbn_shapes set

and the pieces they share:

    model_settings, model_build, model_measure, model_fold, model_report
                        the model benchmark's settings, models and inputs, measurements, fold check, report
    measure             measuring one step: time, memory, profile, round-robin order, the steady state
    targets             the speed and memory targets of both benchmarks (``TARGETS``), judged one way
    cli                 command-line pieces: --device/--threads/--out, --norm-module, HxW, report head and end
    common              summaries, device info, JSON, plots, the studies' synthetic task
"""
