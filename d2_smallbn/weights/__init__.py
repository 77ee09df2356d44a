"""Weight conversion: torchvision-style ResNet checkpoints -> detectron2 weights (a .pkl that
DetectionCheckpointer loads) for a target norm, BN-pretrained or in a norm's own layout.

The command is ``d2-smallbn-convert-weights`` (also ``python -m d2_smallbn.weights``,
``tools/convert_weights.py``; ``d2-smallbn-convert`` and ``python -m d2_smallbn.convert`` are its
former names, kept as aliases). Not to be confused with ``convert_model`` (a built model's pending
norms) and ``convert_batchnorm`` (a PyTorch model's BatchNorm2d layers). Its jobs, one module each:

- ``reading``: the state dict inside a checkpoint file, ``module.`` prefixes removed;
- ``resnet_names``: torchvision ResNet names -> detectron2's, and the depth of a ResNet;
- ``layouts``: one norm's keys: their layout (BN, GN, or a norm's own, which its layer recognizes and
  reads) and what they become for a target norm (detectron2's, or any norm of ``d2_smallbn.norms``);
- ``mapping``: a whole state dict, with the report of every key (mapped, dropped, unmapped);
- ``hints``: the config the weights need, and the convs' weight transform (``--conv``);
- ``writing``: the .pkl with its record of the conversion, the JSON report (``convert_file``);
- ``cli``: the command line.
"""
from .hints import WEIGHT_TRANSFORMS, config_hints
from .layouts import convertible_targets, layouts, target_norm_name, targets
from .mapping import convert_state_dict, is_expected_missing
from .reading import ConvertError, load_checkpoint
from .resnet_names import resnet_depth
from .writing import AUTHOR, METADATA_KEY, convert_file, save_d2_pickle

__all__ = ["AUTHOR", "METADATA_KEY", "WEIGHT_TRANSFORMS", "ConvertError", "config_hints", "convert_file",
           "convert_state_dict", "convertible_targets", "is_expected_missing", "layouts", "load_checkpoint",
           "resnet_depth", "save_d2_pickle", "target_norm_name", "targets"]
