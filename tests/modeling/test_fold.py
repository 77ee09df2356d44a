"""Deployment: folded detectors predict the same, contain only plain convs where foldable, and
trace with detectron2's TracingAdapter."""
import pytest
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

from tiny_detector import tiny_cfg
from d2_smallbn.layers import NormActConv2d
from d2_smallbn.layers import NormStateDriver
from d2_smallbn.modeling import fold_model


def trained_model(norm, conv_type="auto"):
    cfg = tiny_cfg(backbone=norm, fpn=norm, box=norm, mask=norm)
    cfg.MODEL.SMALLBN.CONV = conv_type
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    model.train()
    driver = NormStateDriver(model, update_rate=None)  # BCN keeps the rate it was built with
    for step in range(4):  # move the statistics off their initial values
        driver.before_step(step)
        with torch.no_grad():
            model.backbone(torch.rand(2, 3, 96, 128) * 255)
    return model.eval()


def inputs():
    gen = torch.Generator().manual_seed(3)
    return [{"image": (torch.rand(3, 96, 128, generator=gen) * 255), "height": 96, "width": 128}]


@pytest.mark.parametrize("norm,conv_type", [("CBN", "auto"), ("MABN", "auto"), ("BCN", "auto"), ("GN", "ws"),
                                            ("FrozenBN", "auto")])
def test_folded_model_predicts_the_same(norm, conv_type):
    model = trained_model(norm, conv_type)
    folded = fold_model(model)
    with torch.no_grad():
        feats, feats_folded = model.backbone(inputs()[0]["image"][None]), folded.backbone(inputs()[0]["image"][None])
        for key in feats:
            torch.testing.assert_close(feats_folded[key], feats[key], rtol=1e-4, atol=1e-4)
        boxes = model.inference(inputs(), do_postprocess=False)[0]
        boxes_folded = folded.inference(inputs(), do_postprocess=False)[0]
    torch.testing.assert_close(boxes_folded.pred_boxes.tensor, boxes.pred_boxes.tensor, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(boxes_folded.scores, boxes.scores, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(boxes_folded.pred_masks, boxes.pred_masks, rtol=1e-3, atol=1e-3)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d) and getattr(m, "norm", None) is not None]
    if norm in ("CBN", "MABN", "FrozenBN"):
        assert convs == []  # every normed conv became one plain conv
    else:
        assert all(type(c) is NormActConv2d for c in convs)  # WS baked in, group part kept
    assert model.training is False and fold_model(model) is not model


@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_folded_model_traces_with_tracing_adapter(norm):
    folded = fold_model(trained_model(norm))

    def infer(model, images):
        return model.inference(images, do_postprocess=False)

    adapter = TracingAdapter(folded, [{"image": inputs()[0]["image"]}], inference_func=infer)
    traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    with torch.no_grad():
        expected = adapter(*adapter.flattened_inputs)
        got = traced(*adapter.flattened_inputs)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
