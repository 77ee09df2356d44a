"""Writing converted weights: the .pkl that DetectionCheckpointer loads (``save_d2_pickle``), with the
record of what was converted, and the JSON report; ``convert_file`` reads, converts and writes.

Loading (detectron2 0.7.2) skips a key whose shape differs from the model's with a warning only, and
shapes cannot reveal two mistakes, so the report lists the config the weights need: a bottleneck
torchvision ResNet strides in the 3x3 conv (MODEL.RESNETS.STRIDE_IN_1X1: False), and torchvision's
input is RGB with ImageNet mean/std. Also, FrozenBatchNorm2d fills running_mean/running_var it does
not find with 0/1 without reporting them missing, so a GN checkpoint "loads" into a FrozenBN model
silently. The record (``METADATA_KEY``: the convs' weight transform, the source norm layouts and the
targets) therefore lets fine-tuning (``d2_smallbn.engine.weights_check``) stop before training when
the config's backbone convs, norms or depth do not fit the weights.
"""
import json
import os
import pickle

import torch

from ..paths import check_output_paths
from .mapping import convert_state_dict
from .reading import ConvertError, load_checkpoint

AUTHOR = "d2_smallbn convert_weights"
METADATA_KEY = "d2_smallbn"  # the .pkl's entry describing what was converted (see save_d2_pickle)


def to_numpy(tensor):
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.contiguous().numpy().copy()


def save_d2_pickle(model, path, metadata=None):
    """Writes {"model": {name: ndarray}, "__author__": AUTHOR, "matching_heuristics": True}, plus
    ``metadata`` under METADATA_KEY when given (DetectionCheckpointer ignores other entries).

    DetectionCheckpointer reads a ``.pkl`` with "model" and "__author__" as detectron2 format; an
    author other than "Caffe2" skips the Caffe2 renaming (which would turn '_' into '.', e.g.
    running_sqmean into running.sqmean); matching_heuristics aligns names by suffix, so the keys
    also load into a backbone nested in a detector (backbone.bottom_up.res2...)."""
    data = {"model": {k: to_numpy(v) for k, v in model.items()}, "__author__": AUTHOR, "matching_heuristics": True}
    if metadata is not None:
        data[METADATA_KEY] = metadata
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:
        raise ConvertError(path, f"output cannot be written ({e.strerror or e})",
                           "pass a writable output path") from None


def converted_metadata(src, report):
    """What the .pkl says about its conversion, for the fine-tuning check: the source file, its
    norm layouts, the targets written and the convs' weight transform."""
    return {"source": os.path.abspath(src), "source_norm_layouts": report["source_norm_layouts"],
            "targets_used": report["targets_used"], "weight_transform": report["weight_transform"],
            "num_groups": report["num_groups"]}


def default_report_path(output):
    return os.path.splitext(output)[0] + ".report.json"


def write_report(report, path):
    try:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise ConvertError(path, f"report cannot be written ({e.strerror or e})",
                           "pass --report with a writable path") from None


def convert_file(src, output, target_norm="auto", num_groups=32, keep_classifier=False, report_path=None,
                 trust_pickle=False, weight_transform="unknown"):
    """Reads ``src``, converts, writes ``output`` (.pkl) and the JSON report. Returns the report
    (without the tensors). Raises ConvertError for unusable files."""
    if not output.endswith(".pkl"):
        raise ConvertError(output, "output does not end with .pkl",
                           "name it *.pkl: detectron2 picks the loader by extension, and only .pkl is read "
                           "as a name -> array dict")
    report_path = report_path or default_report_path(output)
    check_output_paths([("output", output), ("--report", report_path)], [("input checkpoint", src)],
                       error=ConvertError)
    state = load_checkpoint(src, trust_pickle=trust_pickle)
    try:
        report = convert_state_dict(state, target_norm, num_groups, keep_classifier, weight_transform)
    except ValueError as e:
        raise ConvertError(src, str(e), "pass a single model's state dict") from None
    model = report.pop("model")
    if not model:
        raise ConvertError(src, f"no torchvision ResNet keys found ({len(state)} keys, e.g. "
                           f"{', '.join(list(state)[:3])})",
                           "pass a ResNet checkpoint with conv1/bn1/layer1-4 keys")
    save_d2_pickle(model, output, converted_metadata(src, report))
    report = {"source": os.path.abspath(src), "output": os.path.abspath(output),
              "num_source_keys": len(state), "num_output_keys": len(model), **report}
    report["report"] = os.path.abspath(report_path)
    write_report(report, report_path)
    return report
