"""The model benchmark's check of a folded model against its unfolded model, before either is timed:
FPN features, box-head outputs on the same proposals and mask-head outputs on the same boxes agree to
a relative ``FOLD_RTOL`` (TF32 off), and at least ``FOLD_MIN_MATCH`` of the end-to-end detections
match (ties among random-init scores may be broken differently)."""
import torch

from .measure import exact_float32

FOLD_RTOL = 1e-3
FOLD_MIN_MATCH = 0.9


def _close(name, ref, out, report):
    err = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    report[name] = {"max_abs_err": err, "max_abs_ref": scale}
    if out.shape != ref.shape or not err <= FOLD_RTOL * scale + 1e-6:
        raise AssertionError(f"folded model differs from the unfolded one in {name}: max abs err {err:.3g} "
                             f"(max |ref| {scale:.3g}, shapes {tuple(out.shape)} vs {tuple(ref.shape)})")


def _match_fraction(ref, out, image_size):
    """Fraction of the unfolded model's detections that the folded model also makes (same class,
    box within 1e-3 of the image size, score within a relative 1e-3)."""
    if len(ref) == 0:
        return 1.0
    if len(out) == 0:
        return 0.0
    dist = (ref.pred_boxes.tensor[:, None, :] - out.pred_boxes.tensor[None, :, :]).abs().amax(-1)
    same = ((dist <= 1e-3 * max(image_size)) & (ref.pred_classes[:, None] == out.pred_classes[None, :])
            & ((ref.scores[:, None] - out.scores[None, :]).abs() <= 1e-3 * ref.scores.abs().max()))
    return same.any(1).float().mean().item()


@torch.no_grad()
def check_fold(s, inputs):
    """Checks ``s.folded`` against ``s.model`` (a ``MeasuredModel``'s) on ``inputs``; returns the errors."""
    try:
        with exact_float32():
            return _check_fold(s.model.eval(), s.folded, inputs)
    finally:
        s.model.train()


def _check_fold(model, folded, inputs):
    report = {}
    images = model.preprocess_image(inputs)
    feats, feats_f = model.backbone(images.tensor), folded.backbone(images.tensor)
    for name in feats:
        _close(f"features.{name}", feats[name], feats_f[name], report)
    # the heads on the same proposals / boxes (the unfolded model's)
    proposals, _ = model.proposal_generator(images, feats, None)
    boxes = [p.proposal_boxes for p in proposals]
    outputs = []
    for m, f in ((model, feats), (folded, feats_f)):
        heads = m.roi_heads
        outputs.append(heads.box_predictor(heads.box_head(heads.box_pooler([f[k] for k in heads.box_in_features],
                                                                            boxes))))
    _close("box_head.class_logits", outputs[0][0], outputs[1][0], report)
    _close("box_head.box_deltas", outputs[0][1], outputs[1][1], report)
    dets = model.inference(inputs, do_postprocess=False)
    masks = torch.cat([m.pred_masks for m in model.inference(inputs, detected_instances=dets, do_postprocess=False)])
    masks_f = torch.cat([m.pred_masks for m in folded.inference(inputs, detected_instances=dets,
                                                                do_postprocess=False)])
    _close("mask_head.masks", masks, masks_f, report)
    # end to end
    dets_f = folded.inference(inputs, do_postprocess=False)
    fractions = [_match_fraction(a, b, a.image_size) for a, b in zip(dets, dets_f)]
    report["detections_matched_fraction"] = min(fractions)
    report["detections_per_image"] = [len(d) for d in dets]
    if min(fractions) < FOLD_MIN_MATCH:
        raise AssertionError(f"folded model's end-to-end detections match only {min(fractions):.0%} of the "
                             "unfolded model's")
    return report
