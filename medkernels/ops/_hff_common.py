"""What the HFF op family (hff_spatial_attention, hff_channel_attention, hff_attention_tail) shares: the
argument checks, the adapters between the ops and the kernels' operand contracts (csrc/ops.h), and the
BatchNorm running-statistics update."""
import torch

from ._common import acc_dtype, check_same_device, check_size, check_tensor


def acc_operand(t, like):
    """A small operand (weight, statistic, gate) as the kernels take it: contiguous, in `like`'s
    accumulation dtype; None stays None."""
    return None if t is None else t.to(acc_dtype(like)).contiguous()


def restore_grad(grad, t):
    """A kernel gradient back to its input's shape and dtype (None where the input is absent)."""
    return None if t is None else grad.reshape(t.shape).to(t.dtype)


def validate_spatial(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, name="x"):
    """Checks the spatial attention's operands (the feature called `name`); returns use_batch_stats."""
    check_tensor(x, name, ndim=4)
    if x.shape[1] < 1 or x.shape[2] * x.shape[3] < 1:
        raise ValueError(f"{name} must have at least one channel and one pixel, got shape {tuple(x.shape)}")
    check_tensor(conv_weight, "conv_weight", ndim=4)
    k = conv_weight.shape[-1]
    if tuple(conv_weight.shape) != (1, 2, k, k) or k % 2 == 0:
        raise ValueError(f"conv_weight must have shape (1, 2, k, k) with odd k, got {tuple(conv_weight.shape)}")
    if k > 31:
        raise ValueError(f"conv_weight's kernel size k = {k} is too large: k <= 31")
    for arg, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(t, arg, ndim=1, optional=True)
        if t is not None and t.shape[0] != 1:
            raise ValueError(f"{arg} must have shape (1,), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    check_same_device(**{name: x}, conv_weight=conv_weight, bn_weight=bn_weight, bn_bias=bn_bias,
                      running_mean=running_mean, running_var=running_var)
    use_batch_stats = bool(training) or running_mean is None
    if use_batch_stats and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"{name} of shape {tuple(x.shape)} has a single value per channel: batch statistics need more than one")
    if training and running_mean is not None and not isinstance(momentum, (int, float)):
        raise ValueError(f"momentum must be a number (cumulative averaging is not supported), got {momentum!r}")
    return use_batch_stats


def update_running_stats(running_mean, running_var, batch_mean, batch_var, training, momentum):
    """The in-place running-statistics update of nn.BatchNorm2d in training mode (unbiased batch variance).

    Computed in the batch statistics' dtype (float32, float64 for float64 inputs) and rounded once into the
    running statistics' dtype, as ATen's batch norm does: float16/bfloat16 running statistics are not rounded
    twice (through a rounded batch statistic)."""
    if training and running_mean is not None:
        with torch.no_grad():
            for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
                acc = torch.promote_types(running.dtype, batch.dtype)
                running.copy_(torch.lerp(running.to(acc), batch.to(acc), momentum))


def validate_channel(x, fc1_weight, fc2_weight, name="x"):
    """Checks the channel attention's operands (the feature called `name`); returns the weights as
    (C // r, C) and (C, C // r) matrices."""
    check_tensor(x, name, ndim=4)
    check_tensor(fc1_weight, "fc1_weight", ndim=(2, 4))
    check_tensor(fc2_weight, "fc2_weight", ndim=(2, 4))
    channels = x.shape[1]
    w1 = fc1_weight.flatten(1) if fc1_weight.dim() == 4 else fc1_weight
    w2 = fc2_weight.flatten(1) if fc2_weight.dim() == 4 else fc2_weight
    if (fc1_weight.dim() == 4 and fc1_weight.shape[2:] != (1, 1)) or w1.shape[1] != channels:
        raise ValueError(f"fc1_weight must have shape (C // r, C) or (C // r, C, 1, 1) with C = {channels}, got {tuple(fc1_weight.shape)}")
    hidden = w1.shape[0]
    if (fc2_weight.dim() == 4 and fc2_weight.shape[2:] != (1, 1)) or tuple(w2.shape) != (channels, hidden):
        raise ValueError(f"fc2_weight must have shape (C, C // r) = ({channels}, {hidden}) (or with 1x1 dims), got {tuple(fc2_weight.shape)}")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"{name} must have a non-empty spatial size to pool over, got {tuple(x.shape)}")
    if channels == 0:
        raise ValueError(f"{name} must have at least one channel, got shape {tuple(x.shape)}")
    check_same_device(**{name: x}, fc1_weight=fc1_weight, fc2_weight=fc2_weight)
    return w1, w2


def validate_tail(l, g, x_f, ln_weight, ln_bias):
    """Checks the fusion tail's operands: the three features and the LayerNorm parameters over their channels."""
    check_tensor(l, "l", ndim=4)
    B, C1, H, W = l.shape
    for name, t in (("g", g), ("x_f", x_f)):
        check_tensor(t, name, ndim=4)
        if t.dtype != l.dtype:
            raise TypeError(f"{name} must have l's dtype {l.dtype}, got {t.dtype}")
        if (t.shape[0], *t.shape[2:]) != (B, H, W):
            raise ValueError(f"{name} must have shape (B, C, H, W) with (B, H, W) = {(B, H, W)} as l, got {tuple(t.shape)}")
    if H * W == 0:
        raise ValueError(f"l must have at least one pixel, got shape {tuple(l.shape)}")
    C2 = g.shape[1]
    total = C1 + C2 + x_f.shape[1]
    check_size(B * total * H * W, "the output (cat[g, l, x_f])", (B, total, H, W))
    checks = [("ln_weight", ln_weight, (total,), "(C1 + C2 + Ci,)"), ("ln_bias", ln_bias, (total,), "(C1 + C2 + Ci,)")]
    for name, t, shape, contract in checks:
        check_tensor(t, name, ndim=len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {contract} = {shape}, got {tuple(t.shape)}")
    check_same_device(l=l, g=g, x_f=x_f, ln_weight=ln_weight, ln_bias=ln_bias)
