"""The ops' behaviour under ``torch.autocast``.

Every public op applies its rule in its functional entry point, before validation: it casts the operands
that PyTorch's own equivalent would compute in the autocast dtype (convolution-like work), leaves the
rest (parameters whose statistics or state stay float32) as they are, and then runs with autocast
switched off, so that the backend computes from the operands' dtypes alone and the reference backend's
own PyTorch calls are not cast a second time. The rule is ordinary traced code, so ``torch.compile``
graphs keep it (dynamo records the casts and the autocast-off region around the custom op).
"""
import contextlib

import torch


def autocast_dtype(x):
    """The lower-precision dtype ``torch.autocast`` has enabled for x's device type now, or None (also for
    a non-tensor x, which the op's validation then refuses)."""
    if not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t, dtype):
    """t in `dtype` if autocast would cast it (a floating tensor other than float64), else t unchanged."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
        return t.to(dtype)
    return t


def autocast_off(x):
    """A context that switches autocast off for x's device type."""
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext()


def layer_norm_out_dtype(t):
    """The dtype F.layer_norm returns under autocast for an input like t: layer_norm is on CUDA autocast's
    float32 list, while CPU autocast leaves it alone (a half input gives a half output)."""
    return torch.float32 if t.device.type == "cuda" and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def run_cast(op, amp, args, cast_at, layer_norm=False):
    """``op(*args)`` as the autocast rule runs it: the arguments at the positions `cast_at` cast to `amp`, the
    others as given, autocast off (args[0] is the tensor whose device type is switched off). With `layer_norm`,
    the result is brought to the dtype F.layer_norm gives under autocast."""
    args = [cast(a, amp) if i in cast_at else a for i, a in enumerate(args)]
    with autocast_off(args[0]):
        out = op(*args)
    return out.to(layer_norm_out_dtype(out)) if layer_norm else out
