"""Mixed precision as users train with it: fp16 autocast with a GradScaler (CUDA's AMP recipe, and
detectron2's AMPTrainer), against the same layer trained in float32 from the same state on the same data."""
import copy

import torch

from layer_blocks import build_layer

STEPS = 6
SCALES = [2.0 ** 12] * 3 + [2.0 ** 7] * 3  # the loss scale drops mid-run, inside MABN's Psi window


def train(layer, inputs, amp, device):
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=SCALES[0], enabled=amp)
    for module in layer.modules():
        if hasattr(module, "set_loss_scaler"):
            module.set_loss_scaler(scaler)  # as SmallBNHook does for detectron2's AMPTrainer
    outputs, scales = [], []
    for step, x in enumerate(inputs):
        if amp and step and SCALES[step] != SCALES[step - 1]:
            scaler.update(SCALES[step])
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = layer(x)
        scaler.scale(out.float().pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        outputs.append(out.detach().float())
        scales.append(scaler.get_scale())
    return outputs, scales


def test_fp16_autocast_with_grad_scaler_tracks_float32_training(kind, device):
    layer = build_layer(kind)
    reference = copy.deepcopy(layer)
    inputs = [torch.randn(2, 4, 6, 6) * 10 for _ in range(STEPS)]
    outputs, scales = train(layer, inputs, True, device)
    ref_outputs, _ = train(reference, inputs, False, device)
    assert scales == SCALES  # the scaler never skipped a step: no inf/NaN in any fp16 gradient
    for step, (out, ref) in enumerate(zip(outputs, ref_outputs)):
        assert out.dtype == torch.float32 and ref.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2, msg=f"output of step {step}")
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32, name  # fp32 master weights
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-2, msg=name)
    for (name, buf), ref_buf in zip(layer.named_buffers(), reference.buffers()):
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, f"{name} must keep fp32 statistics"
            torch.testing.assert_close(buf, ref_buf, rtol=2e-2, atol=2e-2, msg=name)
        else:
            assert torch.equal(buf, ref_buf), name
