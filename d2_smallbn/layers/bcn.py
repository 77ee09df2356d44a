"""Micro-batch Batch-Channel Normalization (BCN+WS paper, Algorithm 1, eq. 40-42).

Running estimates mu_hat, var_hat (buffers ``running_mean``, ``running_var``; start at 0 and 1 or
at a pretrained BN's statistics). Each training step, per channel:

    1. m_b = mean(x),  v_b = mean((x - mu_hat_old)^2)           (variance about the OLD estimate)
    2. mu_hat  <- mu_hat  + r * (m_b - mu_hat)
       var_hat <- var_hat + r * (v_b - var_hat)
    3. x' = gamma_c * (x - mu_hat) / sqrt(var_hat + eps) + beta_c   (UPDATED estimates, constants)
    4. out = GN(x'; G groups, eps) * gamma_g + beta_g              (per-GROUP affine, eq. 42)

r is the update rate: the current learning rate, set by the trainer with ``set_update_rate``.
A layer that trains with rate 0 would silently be GN plus a fixed affine, so it warns once.
Step 3 is BatchNorm in eval mode on the updated estimates: one pass forward, and in backward one
product for dx and one fused reduction for d gamma_c and d beta_c (``_NormalizeByEstimates``).
In eval it is a per-channel affine map, foldable into the conv; step 4 is not.
Both steps compute in float32 (float64 for a float64 input) and return the input's dtype.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (BN_STATISTICS, NormBase, as_vector, batch_mean_var, check_float, check_int, empty_output,
                      full_precision, outside_compiled_graphs, stat_dtype)


def compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def group_norm_per_group_affine(x, num_groups, group_weight, group_bias, eps):
    """Group normalization with one scale and shift per group (length G), statistics in fp32."""
    per_channel, dtype = x.shape[1] // num_groups, compute_dtype(x)
    with full_precision(x):  # the affine in the compute dtype too: a bf16/fp16 model's parameters
        out = F.group_norm(x.to(dtype), num_groups, group_weight.to(dtype).repeat_interleave(per_channel),
                           group_bias.to(dtype).repeat_interleave(per_channel), eps)
    return out.to(x.dtype)


def check_values_per_group(x, num_groups, layer):
    """A group holding a single value (C/G = 1 channel of a 1x1 map) normalizes to 0 whatever the
    input: the output is the group's bias and no gradient flows. Refused, from the shape alone."""
    if x.numel() > 0 and x.numel() // (x.shape[0] * num_groups) == 1:
        raise ValueError(
            f"{layer}: one value per group (input shape {tuple(x.shape)}, num_groups={num_groups}): group "
            "normalization of a single value is 0 whatever the input, and no gradient flows. Fix: use fewer "
            "groups (at least 2 channels per group) or a larger feature map here")


class GroupNormPerGroupAffine(nn.Module):
    """Step 4 of BCN on its own: what remains of a BCN layer once its batch part is folded."""

    norm_parameters = True  # the optimizer's norm rule applies (see NormBase)

    def __init__(self, num_channels, num_groups=32, eps=1e-5):
        super().__init__()
        _check_groups(num_channels, num_groups)
        self.num_channels, self.num_groups = num_channels, num_groups
        self.eps = check_float("eps", eps, 0.0, float("inf"), low_open=True)
        self.weight = nn.Parameter(torch.ones(num_groups))
        self.bias = nn.Parameter(torch.zeros(num_groups))

    def forward(self, x):
        if torch.jit.is_scripting():  # a folded BCN model scripts: TorchScript compiles only this branch
            return _scripted_group_norm_per_group_affine(x, self.num_groups, self.weight, self.bias, self.eps)
        check_values_per_group(x, self.num_groups, type(self).__name__)
        return group_norm_per_group_affine(x, self.num_groups, self.weight, self.bias, self.eps)


def _scripted_group_norm_per_group_affine(x: torch.Tensor, num_groups: int, group_weight: torch.Tensor,
                                          group_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``group_norm_per_group_affine`` and its one-value-per-group check in TorchScript's subset of
    Python: statistics in float32 (float64 for a float64 input); TorchScript has no autocast to turn off."""
    if x.numel() > 0 and x.numel() // (x.shape[0] * num_groups) == 1:
        raise ValueError("GroupNormPerGroupAffine: one value per group: group normalization of a single value is "
                         "0 whatever the input. Fix: use fewer groups or a larger feature map here")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_channel = x.shape[1] // num_groups
    out = F.group_norm(x.to(dtype), num_groups, group_weight.to(dtype).repeat_interleave(per_channel),
                       group_bias.to(dtype).repeat_interleave(per_channel), eps)
    return out.to(x.dtype)


def _check_groups(num_channels, num_groups):
    check_int("num_features", num_channels, 1)
    check_int("num_groups", num_groups, 1)
    if num_channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels {num_channels}")


class BatchChannelNorm2d(NormBase):
    """Micro-batch BCN. Parameters: per-channel ``weight``/``bias`` (batch part, length C) and
    per-group ``group_weight``/``group_bias`` (group part, length G)."""

    def __init__(self, num_features, num_groups=32, eps=1e-5):
        super().__init__()
        _check_groups(num_features, num_groups)
        self.num_features, self.num_groups = num_features, num_groups
        self.eps = check_float("eps", eps, 0.0, float("inf"), low_open=True)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.group_weight = nn.Parameter(torch.ones(num_groups))
        self.group_bias = nn.Parameter(torch.zeros(num_groups))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("update_rate", torch.zeros(()))
        self._rate_is_zero = True  # known on the host without reading the buffer

    own_state = ("update_rate", "group_weight", "group_bias")

    def set_update_rate(self, rate):
        """Sets r, a float or a 0-dim tensor (e.g. one shared LR tensor); no host sync."""
        if torch.is_tensor(rate):
            if rate.dim() != 0:
                raise ValueError(f"update rate must be a 0-dim tensor, got shape {tuple(rate.shape)}")
            self.update_rate.copy_(rate.detach(), non_blocking=True)
            self._rate_is_zero = False
        else:
            rate = check_float("update rate", rate, 0.0, 1.0)
            self.update_rate.fill_(rate)
            self._rate_is_zero = rate == 0.0

    @outside_compiled_graphs("training")
    def forward(self, x):
        check_values_per_group(x, self.num_groups, f"BatchChannelNorm2d({self.num_features})")
        if self.uses_batch and x.numel() > 0:
            if self._rate_is_zero:
                warnings.warn("BatchChannelNorm2d is training with update rate 0: its running estimates "
                              "never move and it degenerates to GroupNorm plus a fixed affine. Set the rate "
                              "each iteration with set_update_rate(lr) (d2_smallbn's trainer hook does).",
                              stacklevel=2)
                self._rate_is_zero = False  # warn once per layer
            self._update_estimates(x)
        if x.numel() == 0:
            return empty_output(x, self.weight, self.bias, self.group_weight, self.group_bias)
        dtype = compute_dtype(x)
        with full_precision(x):  # autocast would return fp32 here; the cast back below is ours
            # Copies of the estimates: a second call in the same iteration updates them in place,
            # and this call's backward must still see the values it used.
            y = _NormalizeByEstimates.apply(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                                            self.running_mean.to(dtype, copy=True),
                                            self.running_var.to(dtype, copy=True), self.eps)
        out = group_norm_per_group_affine(y, self.num_groups, self.group_weight, self.group_bias, self.eps)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_estimates(self, x):
        mean_b, var_b = batch_mean_var(x, stat_dtype(self))
        shifted_var = var_b + (mean_b - self.running_mean).square_()
        self.running_var.add_(self.update_rate * (shifted_var - self.running_var))
        self.running_mean.add_(self.update_rate * (mean_b - self.running_mean))

    def eval_scale_shift(self):
        """The batch part (step 3) as per-channel (scale, shift); the estimates are constants."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean.clone() * scale

    def normalizing_statistics(self, x, out):
        """The (mean, var) step 3 normalized with in the training forward just run: the running
        estimates, updated before use (see ``d2_smallbn.layers.statistics``)."""
        return self.running_mean.double().clone(), self.running_var.double().clone()

    def group_part(self):
        """A standalone module for step 4, sharing nothing with this layer (for folding)."""
        part = GroupNormPerGroupAffine(self.num_features, self.num_groups, self.eps)
        part.weight.data.copy_(self.group_weight.detach())
        part.bias.data.copy_(self.group_bias.detach())
        return part.to(self.group_weight)  # same device and dtype

    def unfolded_part(self):
        """What folding leaves after the conv (``fold_conv_norm``): the group part."""
        return self.group_part()

    def extra_repr(self):
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"

    # Its released checkpoints (the BCN+WS authors'): an inner BatchNorm "bn.*" and the group affine,
    # "gn.weight"/"gn.bias" or "weight"/"bias" beside the inner BatchNorm (the authors' code), of length
    # G, or per channel when constant within each group. Weight conversion reads the inner BatchNorm as
    # a BatchNorm checkpoint (``own_layout_batch_prefix``) and the group affine here.
    own_layout_batch_prefix = "bn."

    @classmethod
    def is_own_layout(cls, keys):
        return any(key.startswith("bn.") for key in keys)

    @classmethod
    def own_layout_example(cls, channels, num_groups):
        example = {f"bn.{key}": torch.ones(channels) for key in ("weight", "bias") + BN_STATISTICS}
        return {**example, "gn.weight": torch.ones(num_groups), "gn.bias": torch.ones(num_groups)}

    @classmethod
    def map_own_layout(cls, sub, result, name, into, num_groups):
        affine = _group_affine_leaves(sub)
        for leaf in sub:
            if not leaf.startswith("bn.") and leaf not in affine:
                result.unmap([leaf], f"not part of a {name} norm's batch part or group affine")
        if not affine:
            result.notes.append(f"{name} norm without a group affine: group_weight/group_bias start at 1/0")
        elif into is not None:
            result.unmap(affine, f"the group part of {name} has no counterpart in a {into} norm")
        else:
            _read_group_affine([sub[leaf] for leaf in affine], affine, sub["bn.running_mean"].numel(), num_groups,
                               result)


def _group_affine_leaves(sub):
    """The group affine's leaves in a released BCN checkpoint norm: [weight(, bias)], or []."""
    for prefix in ("gn.", ""):
        if prefix + "weight" in sub:
            return [prefix + "weight"] + ([prefix + "bias"] if prefix + "bias" in sub else [])
    return []


def _read_group_affine(tensors, leaves, channels, num_groups, result):
    """The group affine (length G, or length C constant within groups of C / ``num_groups``) as
    group_weight/group_bias; unmapped, with the reason, when it has no exact per-group value."""
    vectors = [as_vector(t) for t in tensors]
    if any(v is None for v in vectors) or len({v.numel() for v in vectors}) > 1:
        shapes = " and ".join(str(tuple(t.shape)) for t in tensors)
        result.unmap(leaves, f"group affine of shape {shapes} is not a vector of one length")
        return
    length = vectors[0].numel()
    if length == num_groups and channels % length == 0:
        how = "copy (one value per group)"
    elif length == channels:
        if channels % num_groups:
            result.unmap(leaves, f"per-channel group affine (length {channels}) cannot be reduced to {num_groups} "
                                 f"groups: {num_groups} does not divide {channels} (--num-groups)")
            return
        per_group = _one_value_per_group(vectors, num_groups)
        if per_group is None:
            result.unmap(leaves, f"per-channel group affine (length {channels}) varies within groups of "
                                 f"{channels // num_groups} channels; BatchChannelNorm2d has one scale and shift per "
                                 f"group (G={num_groups}), so it cannot be mapped exactly")
            return
        vectors = per_group
        how = f"per-channel (length {channels}), constant within {num_groups} groups: one value per group"
    elif channels % length == 0:
        how = "copy (one value per group)"
        result.notes.append(f"group affine has {length} groups, not --num-groups {num_groups}: the model needs "
                            f"MODEL.SMALLBN.BCN.NUM_GROUPS = {length}")
    else:
        result.unmap(leaves, f"group affine of length {length} is neither per channel ({channels}) nor per group "
                             f"(a divisor of {channels})")
        return
    for target, vector, leaf in zip(("group_weight", "group_bias"), vectors, leaves):
        result.copy(target, vector, [leaf], how)


def _one_value_per_group(vectors, num_groups):
    """Per-channel vectors as one value per group, or None when one varies within a group."""
    grouped = [v.view(num_groups, -1) for v in vectors]
    if not all(torch.equal(g, g[:, :1].expand_as(g)) for g in grouped):
        return None
    return [g[:, 0].clone() for g in grouped]


class _NormalizeByEstimates(torch.autograd.Function):
    """Step 3: y = (x - mean) * rsqrt(var + eps) * weight + bias, with ``mean`` and ``var`` constants.

    The forward is torch's eval-mode batch_norm. Its backward for x is several times slower on CPU
    than the single product it amounts to, so dx is that product, and only d weight and d bias
    come from batch_norm's backward (one fused reduction over grad_out and x).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, var = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True])
        if ctx.needs_input_grad[0]:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            grad_x = grad_out * (weight * torch.rsqrt(var + ctx.eps)).view(shape)
        return grad_x, grad_weight, grad_bias, None, None, None
