"""Helpers every Triton kernel file shares: the dtypes, the accumulation dtype, whether the kernels run in
Triton's interpreter, the launchers' tile-size mode, the checks of a launcher's operands, and the launch itself
(which tests can record)."""
import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# CUDA's grid limits: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65535.
MAX_GRID_0 = 2**31 - 1
MAX_GRID_1 = 65535


def acc_dtype(dtype):
    """The accumulation (and scan-state) dtype of inputs of `dtype`: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype):
    """acc_dtype as a Triton type, for a kernel's ACC constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _probe():
    pass


def interpreted():
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_probe).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------------
# tile sizes
# ----------------------------------------------------------------------------------------------------------
TILE_MODES = ("auto", "gpu", "small")
_forced_mode = []  # stack of tile_mode() contexts


def current_tile_mode():
    """The tile sizes the launchers choose now: "interpreter" (large tiles: the interpreter pays per program),
    "gpu" (the GPU's tiles) or "small" (the smallest, 2 elements a tiled dimension, so that tiny inputs span
    several tiles). Set by tile_mode() or $MEDKERNELS_TRITON_TILES; "auto" (the default) is "interpreter" in
    the interpreter, "gpu" on a GPU."""
    mode = _forced_mode[-1] if _forced_mode else (os.environ.get("MEDKERNELS_TRITON_TILES") or "auto")
    if mode not in TILE_MODES:
        raise ValueError(f"MEDKERNELS_TRITON_TILES must be one of {TILE_MODES}, got {mode!r}")
    if mode == "auto":
        return "interpreter" if interpreted() else "gpu"
    return mode


@contextlib.contextmanager
def tile_mode(mode):
    """Context manager: the launchers inside choose the tiles of `mode` (one of TILE_MODES)."""
    if mode not in TILE_MODES:
        raise ValueError(f"tile mode must be one of {TILE_MODES}, got {mode!r}")
    _forced_mode.append(mode)
    try:
        yield
    finally:
        _forced_mode.pop()


def tile_size(interpreter, gpu, small=2):
    """The launcher's tile size (or cap) for the current mode: each launcher's one place of choice."""
    return {"interpreter": interpreter, "gpu": gpu, "small": small}[current_tile_mode()]


# ----------------------------------------------------------------------------------------------------------
# operand checks and the launch
# ----------------------------------------------------------------------------------------------------------
def check_device(t, op, arg):
    """ValueError unless t is a CUDA tensor, or any tensor under the interpreter (or while launches are
    recorded without running: nothing reads the tensors then)."""
    if t.device.type != "cuda" and not interpreted() and not _dry_run():
        raise ValueError(
            f"{op}: expected {arg} to be a CUDA tensor, got a tensor on {t.device} "
            "(CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing medkernels)"
        )


def check_tensor(t, op, arg, shape, layout, dtype, device, optional=False):
    """TypeError/ValueError naming `arg` unless t is a contiguous tensor of `shape` and `dtype` on `device`
    (a CUDA device, or any device under the interpreter); None passes when optional."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: expected {arg} to be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {arg} to be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: expected {arg} of shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: expected {arg} to have dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: expected {arg} to be contiguous (call .contiguous() first), got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: expected {arg} on {device} (the device of u), got {t.device}")
    check_device(t, op, arg)


class Launch(NamedTuple):
    """One launch as record_launches() saw it: the jitted kernel, its grid, positional arguments and constexprs."""
    kernel: object
    grid: tuple
    args: tuple
    meta: dict


_recorders = []  # stack of (launches list, run) of the active record_launches() contexts


def _dry_run():
    return bool(_recorders) and not _recorders[-1][1]


@contextlib.contextmanager
def record_launches(run=True):
    """Context manager yielding the list of the Launch of every kernel launched inside. With run=False the
    kernels are not run (outputs stay uninitialised) and tensors on any device pass check_device: that is how
    the launchers' exact argument types and constexprs are collected without a GPU."""
    launches = []
    _recorders.append((launches, run))
    try:
        yield launches
    finally:
        _recorders.pop()


def launch(kernel, grid, device, *args, **meta):
    """kernel[grid](*args, **meta) on `device`; a grid past CUDA's limits is a ValueError."""
    if grid[0] > MAX_GRID_0 or any(g > MAX_GRID_1 for g in grid[1:]):
        raise ValueError(f"the input is too large for one launch (grid {grid})")
    for launches, _ in _recorders:
        launches.append(Launch(kernel, tuple(grid), args, dict(meta)))
    if _dry_run():
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


@triton.jit
def round_to_bf16(v):
    """float32 -> bfloat16, rounding to nearest even with integer ops.

    Same result as the hardware conversion on a GPU; Triton's interpreter would truncate instead.
    """
    bits = v.to(tl.uint32, bitcast=True)
    upper = bits >> 16
    lower = bits & 0xFFFF
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & 1) == 1))
    rounded = (upper + round_up.to(tl.uint32)) << 16
    # NaN: keep it a (quiet) NaN rather than letting the rounding carry change it.
    bits = tl.where(v != v, (upper | 0x40) << 16, rounded)
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def store_as(ptr, value, mask):
    """Store float values in ptr's dtype; bfloat16 rounds to nearest even (the interpreter would truncate)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, round_to_bf16(value.to(tl.float32)), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
