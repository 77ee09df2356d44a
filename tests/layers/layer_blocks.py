"""One conv + norm block per method, shared by the layer tests (a module of its own: every test
folder has a ``conftest``, so ``from conftest import`` would find whichever pytest loaded first)."""
from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                               MovingAverageBatchNorm2d, WSConv2d)


def build_layer(kind, cin=4, cout=8):
    """A conv + norm block of each method, with small windows so that a few steps reach the
    steady-state regime (window full, moving averages and clipping active)."""
    if kind == "cbn":
        return CBNConv2d(cin, cout, 3, padding=1, norm=CrossIterationBatchNorm2d(cout, window_size=3, burnin_iters=1))
    if kind == "mabn":
        norm = MovingAverageBatchNorm2d(cout, buffer_size=2, warmup_iters=2, clip_warmup_iters=3)
        return CenteredConv2d(cin, cout, 3, padding=1, norm=norm)
    if kind == "bcn":
        layer = WSConv2d(cin, cout, 3, padding=1, norm=BatchChannelNorm2d(cout, num_groups=4))
        layer.norm.set_update_rate(0.1)
        return layer
    if kind == "brn":
        from d2_smallbn.layers import NormActConv2d
        from d2_smallbn.layers.brn import BatchRenorm2d
        return NormActConv2d(cin, cout, 3, padding=1, bias=False,
                             norm=BatchRenorm2d(cout, warmup_iters=1, r_max_iters=3, d_max_iters=2))
    raise ValueError(kind)


KINDS = ("cbn", "mabn", "bcn", "brn")
