"""The CBN window probe: its exact window is BN over the stored past inputs through the current
conv, CBN's compensated mean matches it (the Taylor step is exact for the mean), the naive window
does not once the weights move, and in a detectron2 run the hook measures the FPN's CBN convs."""
import json

import pytest
import torch

from d2_smallbn.bench.cbn_window_probe import CBNWindowProbeHook, WindowProbe, input_scale, main, parse_layers, plot
from d2_smallbn.layers import CBNConv2d, CrossIterationBatchNorm2d, NormStateDriver


def trained_probe(lr, steps=7, window=4, seed=0):
    """A CBN conv trained by SGD on random inputs, probed at every step; returns the probe, its
    results per step and the inputs seen."""
    torch.manual_seed(seed)
    conv = CBNConv2d(3, 5, 3, padding=1, norm=CrossIterationBatchNorm2d(5, window_size=window)).double()
    opt = torch.optim.SGD(conv.parameters(), lr=lr)
    driver = NormStateDriver(conv)
    probe, results, inputs = WindowProbe(conv), [], []
    target = torch.randn(2, 5, 6, 6, dtype=torch.double)  # a loss that the normalized output's pattern changes
    for t in range(steps):
        x = torch.randn(2, 3, 6, 6, dtype=torch.double) * (1 + 0.1 * t) + 0.3 * t
        inputs.append(x)
        driver.before_step(t)
        probe.due = True
        (conv(x) * target).sum().backward()
        results.append(probe.last)
        opt.step()
        opt.zero_grad()
    return conv, probe, results, inputs


def test_exact_window_is_bn_over_the_past_inputs_through_the_current_conv():
    conv, probe, results, inputs = trained_probe(lr=0.5)
    assert len(probe.inputs) == 3 and all(torch.equal(a, b) for a, b in zip(probe.inputs, inputs[-3:]))
    x_now = torch.randn(2, 3, 6, 6, dtype=torch.double)
    with torch.no_grad():
        y = conv._conv_forward(torch.cat([x_now, *probe.inputs]), conv.weight, None)  # equal batch sizes
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    with torch.no_grad():  # naive: the past statistics as they were, through the weights of their time
        past = [conv._conv_forward(xp, w, None) for xp, w in zip(probe.inputs, probe.weights)]
        stale = torch.cat([conv._conv_forward(x_now, conv.weight, None), *past])
    result = probe.measure(x_now)
    sigma = var.sqrt()
    stale_mean_error = ((stale.mean((0, 2, 3)) - mean).abs() / sigma).mean().item()
    assert result["naive_mean"] == pytest.approx(stale_mean_error, rel=1e-9)  # measured against BN of the concatenation
    assert result["window"] == 4
    scale = input_scale(x_now)
    assert scale["input_abs_mean"] == pytest.approx(x_now.mean((0, 2, 3)).abs().mean().item())
    assert scale["input_std"] == pytest.approx(x_now.std((0, 2, 3), unbiased=False).mean().item())


@pytest.mark.parametrize("lr", [0.5, 2e-4])
def test_compensation_is_exact_for_the_mean_and_the_naive_window_is_not(lr):
    _, _, results, _ = trained_probe(lr=lr)
    measured = [r for r in results if "window" in r]
    assert [r["window"] for r in measured] == [2, 3, 4, 4, 4, 4]  # the window grows, then keeps k entries
    for r in measured:
        assert r["compensated_mean"] < 1e-9  # the mean is linear in the weights: exact at any step size
        assert r["naive_mean"] > 1e-4 and r["drift"] > 1e-4


def test_the_compensated_variance_falls_short_by_the_second_order_term():
    """methods.md: each compensated nu falls short of the exact one by mean(conv(x, W_t - W_old)^2);
    the means being exact, the window's variance falls short by the average of those."""
    conv, probe, _, _ = trained_probe(lr=2e-4)
    x_now = torch.randn(2, 3, 6, 6, dtype=torch.double)
    w = conv.weight.detach()
    with torch.no_grad():
        y = conv._conv_forward(torch.cat([x_now, *probe.inputs]), w, None)
        shortfall = sum(conv._conv_forward(xp, w - wp, None).square().mean((0, 2, 3))
                        for xp, wp in zip(probe.inputs, probe.weights)) / (len(probe.inputs) + 1)
    var = y.var((0, 2, 3), unbiased=False)
    result = probe.measure(x_now)
    assert result["compensated_var"] == pytest.approx((shortfall / var).mean().item(), rel=1e-6)
    assert result["compensated_var"] > 1e-6


def test_unchanged_weights_make_every_window_exact():
    _, _, results, _ = trained_probe(lr=0.0)
    for r in (r for r in results if "window" in r):
        assert r["compensated_mean"] < 1e-12 and r["naive_mean"] < 1e-12 and r["compensated_var"] < 1e-12
        assert r["drift"] == 0


def test_a_conv_without_cbn_and_a_bad_layer_list_are_refused():
    with pytest.raises(ValueError, match="no CrossIterationBatchNorm2d"):
        WindowProbe(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(Exception, match="LABEL=MODULE"):
        parse_layers("backbone.fpn_lateral3")
    with pytest.raises(SystemExit):
        main(["--period", "0"])


@pytest.mark.slow
def test_the_hook_measures_the_fpn_convs_of_a_detectron2_run(tmp_path):
    from d2_smallbn.data import generate_dataset, register_shapes
    from d2_smallbn.engine import SmallBNTrainer
    from d2_smallbn.engine.defaults import build_config

    root = tmp_path / "shapes"
    generate_dataset(root, num_train=4, num_val=2)
    register_shapes(root)
    cfg = build_config("quickstart/mask_rcnn_R18_FPN_cbn.yaml", [
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path),
        "MODEL.SMALLBN.CBN.WINDOW_SIZE", "3", "MODEL.SMALLBN.CBN.BURNIN_ITERS", "1"])
    trainer = SmallBNTrainer(cfg)
    trainer.register_hooks([CBNWindowProbeHook({"lateral": "backbone.fpn_lateral3", "output": "backbone.fpn_output3"},
                                               period=2)])
    trainer.resume_or_load(resume=False)
    trainer.train()
    lines = [json.loads(s) for s in (tmp_path / "cbn_window_probe.json").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 2, 4]
    assert "cbn_window/lateral/compensated_mean" not in lines[0]  # burn-in: no window yet
    assert lines[0]["cbn_window/lateral/input_std"] > 0 and lines[0]["cbn_window/lateral/input_abs_mean"] > 0
    for r in lines[1:]:
        for label in ("lateral", "output"):
            assert r[f"cbn_window/{label}/compensated_mean"] < 1e-5  # the layers store in float32
            assert r[f"cbn_window/{label}/window"] == 3 if r["iteration"] == 4 else 2
            assert r[f"cbn_window/{label}/global_mean"] > 1e-4  # one process: the window against its current batch
    for label in ("lateral", "output"):  # burn-in: BN over the only process's batch is the whole batch's
        assert lines[0][f"cbn_window/{label}/global_mean"] == pytest.approx(0.0, abs=1e-6)
    png = plot(tmp_path)  # one panel per quantity, both layers drawn
    assert png == tmp_path / "cbn_window_probe.png" and png.stat().st_size > 20_000
    with pytest.raises(SystemExit, match="cbn_window_probe.json is missing"):
        plot(tmp_path / "nowhere")
