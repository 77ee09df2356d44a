"""A Conv2d that carries its norm and activation, the shape of detectron2's ``Conv2d``.

Subclasses change only ``effective_weight`` (WS, centring) or how the norm is called (CBN),
so that all of them replace detectron2's ``Conv2d`` one-for-one and fold the same way.
"""
from torch import nn


class NormActConv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` plus ``norm`` and ``activation``: forward is activation(norm(conv(x)))."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def effective_weight(self):
        """The weight the convolution actually uses."""
        return self.weight

    def apply_norm(self, y, x):
        return self.norm(y)

    def forward(self, x):
        y = self._conv_forward(x, self.effective_weight(), self.bias)
        if self.norm is not None:
            y = self.apply_norm(y, x)
        if self.activation is not None:
            y = self.activation(y)
        return y
