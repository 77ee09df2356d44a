"""A torchvision-style ResNet state dict -> a detectron2 one, with the report of every key: convs map
1:1 (weight standardization and centring happen in the conv's forward, so a WS or weight-centralized
checkpoint stores the raw weights under the usual names); each norm is recognized by its keys and
written for the target norm (``layouts``)."""
import fnmatch
from collections import Counter

import torch

from ..layers._common import as_vector
from .hints import WEIGHT_TRANSFORMS, config_hints, conv_notes, transform_notes
from .layouts import convert_norm, default_target, keeps_counter, layout_of, table_targets, targets
from .reading import strip_module_prefix
from .resnet_names import CLASSIFIER_KEY, CONV_KEY, NORM_KEY, detectron2_module


def convert_state_dict(state, target_norm="auto", num_groups=32, keep_classifier=False, weight_transform="unknown"):
    """Converts a torchvision-style ResNet state dict. Returns a report dict whose "model" entry is the
    detectron2 state dict (name -> tensor); see ``convert_file`` for the other entries.
    ``weight_transform``: what the convs did to their weights in training (WEIGHT_TRANSFORMS)."""
    if target_norm not in targets():
        raise ValueError(f"target norm must be one of {targets()}, got {target_norm!r}")
    if weight_transform not in WEIGHT_TRANSFORMS:
        raise ValueError(f"weight transform must be one of {WEIGHT_TRANSFORMS}, got {weight_transform!r}")
    state, stripped = strip_module_prefix(state)
    found = _sort_keys(state, keep_classifier)
    model, mapping, dropped, unmapped = found["model"], found["mapping"], found["dropped"], found["unmapped"]
    notes, layouts, targets_used, written = [], Counter(), Counter(), {}
    for src_mod, (dst_mod, sub) in found["norms"].items():
        layout = layout_of(sub)
        layouts[layout or "unrecognized"] += 1
        target = default_target(layout) if target_norm == "auto" else target_norm
        targets_used[target] += 1
        result = convert_norm(sub, layout, target, num_groups)
        written[dst_mod] = (target, set(result.out))
        for leaf, (tensor, how, src_leaves) in result.out.items():
            vector = as_vector(tensor) if tensor.dim() > 1 else None  # vectors stored as (1, C, 1, 1) or (1, G, 1)
            if vector is not None:
                how += f" (flattened from {tuple(tensor.shape)})"
                tensor = vector
            model[f"{dst_mod}.{leaf}"] = tensor
            mapping.append((f"{dst_mod}.{leaf}", [f"{src_mod}.{s}" for s in src_leaves], how))
        dropped += [(f"{src_mod}.{leaf}", reason) for leaf, reason in result.dropped]
        unmapped += [(f"{src_mod}.{leaf}", reason) for leaf, reason in result.unmapped]
        notes += [f"{src_mod}: {n}" for n in result.notes]

    hints = config_hints(state, targets_used, num_groups, weight_transform, model=model)
    notes += conv_notes(targets_used, weight_transform) + transform_notes(targets_used, weight_transform)
    return {
        "model": model,
        "config_hints": hints,
        "weight_transform": weight_transform,
        "module_prefix_stripped": stripped,
        "target_norm": target_norm,
        "targets_used": dict(targets_used),
        "num_groups": num_groups,
        "source_norm_layouts": dict(layouts),
        "mapped": [{"to": dst, "from": src, "how": how} for dst, src, how in mapping],
        "dropped": [{"key": k, "reason": r} for k, r in dropped],
        "unmapped": [{"key": k, "reason": r} for k, r in unmapped],
        "notes": _dedupe_notes(notes),
        "expected_missing_on_load": expected_missing(model, written, targets_used),
    }


def _sort_keys(state, keep_classifier):
    """Convs and the classifier renamed (``model``, ``mapping``), the norms' keys gathered per norm
    (``norms``: torchvision module -> (detectron2 module, {leaf: tensor})), the rest dropped or unmapped."""
    found = {"model": {}, "mapping": [], "dropped": [], "unmapped": [], "norms": {}}
    for key, value in state.items():
        if not torch.is_tensor(value):
            found["unmapped"].append((key, f"not a tensor ({type(value).__name__})"))
        elif conv := CONV_KEY.match(key):
            _rename(found, key, f"{detectron2_module(conv)}.{conv.group('leaf')}", value)
        elif norm := NORM_KEY.match(key):
            _, leaves = found["norms"].setdefault(norm.group("mod"), (detectron2_module(norm) + ".norm", {}))
            leaves[norm.group("rest")] = value
        elif (classifier := CLASSIFIER_KEY.match(key)) and keep_classifier:
            _rename(found, key, f"linear.{classifier.group('leaf')}", value)
        elif classifier:
            found["dropped"].append((key, "ImageNet classifier: a detection backbone has none (--keep-classifier "
                                          "writes it as linear.*)"))
        else:
            found["unmapped"].append((key, "not a torchvision ResNet key (conv1, bn1, layer1-4, fc)"))
    return found


def _rename(found, key, new, value):
    found["model"][new] = value
    found["mapping"].append((new, [key], "copy"))


def expected_missing(model, written, targets_used):
    """Patterns of the keys that loading ``model`` reports missing although nothing is lost: the layer
    state that starts fresh (``missing_on_load`` of the target's layer), and num_batches_tracked of a
    FrozenBatchNorm2d made from BN/SyncBN by FREEZE_AT when the checkpoint had none."""
    expected = set()
    for target, leaves in written.values():
        spec = table_targets().get(target)
        if spec is not None:
            expected.update(f"*.norm.{k}" for k in spec.layer.missing_on_load(leaves))
    variances = [k for k in model if k.endswith(".norm.running_var")]
    if any(k[: -len("running_var")] + "num_batches_tracked" not in model for k in variances) \
            and any(keeps_counter(t) for t in targets_used):
        expected.add("*.norm.num_batches_tracked")  # FrozenBatchNorm2d reports it when absent
    return sorted(expected)


def is_expected_missing(key, patterns):
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _dedupe_notes(notes):
    """Per-norm notes that repeat for every norm are listed once, with the count."""
    by_text = Counter(n.split(": ", 1)[1] for n in notes)
    out, seen = [], set()
    for n in notes:
        text = n.split(": ", 1)[1]
        if by_text[text] > 1:
            if text not in seen:
                seen.add(text)
                out.append(f"{by_text[text]} norms: {text}")
        else:
            out.append(n)
    return out
