"""Validation and autograd helpers shared by the ops."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The GPU kernels compute element offsets in 32 bits: every tensor an op reads or writes is refused at this size.
MAX_ELEMENTS = 2**31 - 1


def acc_dtype(t):
    """The dtype the ops accumulate in (statistics, scan state, gates) for tensor t: float64 for float64,
    float32 for float16, bfloat16 and float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_tensor(t, name, ndim=None, dtypes=FLOAT_DTYPES, optional=False):
    """Raise a TypeError/ValueError naming `name` unless `t` is a tensor of the expected rank and dtype."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        kinds = "complex" if t.is_complex() else ("integer/bool" if not t.is_floating_point() else str(t.dtype))
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {kinds} ({t.dtype})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    check_size(t.numel(), name, tuple(t.shape))
    # a dense tensor spans exactly its elements (checked above); only other views need the span computed
    if t.numel() and not t.is_contiguous() and not (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        if span > MAX_ELEMENTS:
            raise ValueError(f"{name} spans {span} elements of memory (shape {tuple(t.shape)}, strides {t.stride()}): "
                             f"more than 2**31 - 1, which the kernels' 32-bit offsets cannot address; pass a compact copy")


def empty_batch_to_ref(backend, x):
    """The backend to run: an empty batch has nothing to compute, so it goes to the reference, which gives
    the empty output and gradients for every shape (the kernels assume at least one image)."""
    return "ref" if x.shape[0] == 0 else backend


def check_size(numel, name, shape):
    """Refuse a tensor (an input, or an output about to be allocated) of 2**31 elements or more."""
    if numel > MAX_ELEMENTS:
        raise ValueError(f"{name} of shape {shape} has {numel} elements: more than 2**31 - 1, which the kernels' "
                         f"32-bit offsets cannot address")


def check_shape(t, name, shape, contract):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {contract} = {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors):
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def eager_plain(*tensors):
    """Whether a call on `tensors` may skip the torch.library custom op and run its implementation directly:
    eager mode (not traced by torch.compile), no functorch transform, no torch function or dispatch mode
    active, and only plain tensors or Parameters (None allowed). The custom op's Python dispatch costs tens of
    microseconds a call, which is most of the time of a small convolution; these conditions are exactly
    those under which the op would have done nothing but call that same implementation."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_function_stack() > 0 or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(t is None or type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def vjp(fn, primals, cotangents):
    """Gradients of the tensor primals of ``fn(*primals)`` against ``cotangents``.

    The reference backends' backward: torch.func works inside a custom op's implementation, where
    ordinary autograd recording is switched off. Non-tensor primals are held fixed; ``None`` cotangents
    are zeros. Returns one gradient (or None) per primal.
    """
    slots = [i for i, p in enumerate(primals) if isinstance(p, torch.Tensor) and p.is_floating_point()]

    def f(*tensors):
        args = list(primals)
        for i, t in zip(slots, tensors):
            args[i] = t
        return fn(*args)

    out, pullback = torch.func.vjp(f, *[primals[i] for i in slots])
    outs = out if isinstance(out, tuple) else (out,)
    cots = cotangents if isinstance(cotangents, tuple) else (cotangents,)
    cots = tuple(torch.zeros_like(o) if c is None else c.to(o.dtype) for o, c in zip(outs, cots))
    grads = pullback(cots if isinstance(out, tuple) else cots[0])
    result = [None] * len(primals)
    for i, g in zip(slots, grads):
        result[i] = g
    return result
