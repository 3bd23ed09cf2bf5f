"""Triton kernels of cross_scan / cross_merge (MedMamba's four-direction scan layout).

Installed as ``medkernels.kernels.cross_scan``.

With L = H * W and pixel p = h * W + w, scan direction k visits the pixels in this order:

* k = 0, row-major: position i <-> pixel i
* k = 1, column-major: position i <-> pixel (i % H) * W + i // H
* k = 2, reversed row-major: position i <-> pixel L - 1 - i
* k = 3, reversed column-major: position i <-> the direction-1 pixel of position L - 1 - i

``cross_scan_fwd(x)``: contiguous x (B, C, H, W) -> y (B, 4, C, L), y[b, k, c, i] = x[b, c, pixel_k(i)].
``cross_merge_fwd(y)``: contiguous y (B, 4, C, H, W) -> x (B, C, L),
x[b, c, p] = sum_k y[b, k, c, position_k(p)]; cross_merge is the adjoint of cross_scan.

Both kernels work pixel-wise: a program handles a tile of BLOCK_R (b, c) rows by BLOCK_L
consecutive pixels (program ids: (block of rows, block of L)), computes where each of the four directions visits them,
and scatters (scan) or gathers (merge) there.  The merge sums in float32 (float64 for float64
inputs) and rounds once to the input dtype.

On a GPU the tensors must be CUDA tensors.  For CPU tensors set ``TRITON_INTERPRET=1`` before this
module is imported: the kernels then run in Triton's interpreter (that is how CI tests them).
"""
import torch
import triton
import triton.language as tl

from ._utils import MAX_GRID_0, MAX_GRID_1, SUPPORTED_DTYPES, check_device, launch, round_to_bf16, tile_size

__all__ = ["cross_scan_fwd", "cross_merge_fwd", "SUPPORTED_DTYPES", "MAX_BLOCK_L"]

# Elements (rows x pixels) one program handles on a GPU.
MAX_BLOCK_L = 1024


@triton.jit
def _scan_positions(p, H, W, L):
    """Positions at which directions 0, 1, 2 and 3 visit pixels p (p = h * W + w)."""
    h = p // W
    w = p - h * W
    col = w * H + h
    return p, col, L - 1 - p, L - 1 - col


@triton.jit
def _cross_scan_fwd_kernel(x_ptr, y_ptr, rows, C, H, W, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    # One program: a BLOCK_R x BLOCK_L tile of (b, c) rows and pixels of x, scattered to y's four directions.
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    b = row // C
    c = row - b * C
    p = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    mask = (row < rows) & (p < L)
    values = tl.load(x_ptr + row * L + p, mask=mask)
    pos0, pos1, pos2, pos3 = _scan_positions(p, H, W, L)
    tl.store(y_ptr + ((b * 4 + 0) * C + c) * L + pos0, values, mask=mask)
    tl.store(y_ptr + ((b * 4 + 1) * C + c) * L + pos1, values, mask=mask)
    tl.store(y_ptr + ((b * 4 + 2) * C + c) * L + pos2, values, mask=mask)
    tl.store(y_ptr + ((b * 4 + 3) * C + c) * L + pos3, values, mask=mask)


@triton.jit
def _cross_merge_fwd_kernel(
    y_ptr, x_ptr, rows, C, H, W, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, ACC_DTYPE: tl.constexpr
):
    # One program: a BLOCK_R x BLOCK_L tile of x, each pixel the sum of its four directions in y.
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    b = row // C
    c = row - b * C
    p = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    mask = (row < rows) & (p < L)
    pos0, pos1, pos2, pos3 = _scan_positions(p, H, W, L)
    acc = tl.load(y_ptr + ((b * 4 + 0) * C + c) * L + pos0, mask=mask, other=0.0).to(ACC_DTYPE)
    acc += tl.load(y_ptr + ((b * 4 + 1) * C + c) * L + pos1, mask=mask, other=0.0).to(ACC_DTYPE)
    acc += tl.load(y_ptr + ((b * 4 + 2) * C + c) * L + pos2, mask=mask, other=0.0).to(ACC_DTYPE)
    acc += tl.load(y_ptr + ((b * 4 + 3) * C + c) * L + pos3, mask=mask, other=0.0).to(ACC_DTYPE)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        out = round_to_bf16(acc)
    else:
        out = acc.to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * L + p, out, mask=mask)


def _check_input(t, op, arg, rank, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {arg} to be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(
            f"{op}: expected {arg} to be a {rank}-D tensor of shape {layout}, "
            f"got a {t.dim()}-D tensor of shape {tuple(t.shape)}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected {arg} to have dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: expected {arg} to be contiguous (call .contiguous() first), got strides {t.stride()}")
    check_device(t, op, arg)


def _blocks(rows, L):
    """Tile sizes (BLOCK_R rows, BLOCK_L pixels): about a thousand elements a program on a GPU; the
    interpreter pays per program, so there a program takes a large tile instead (see tile_size)."""
    rows2, L2 = triton.next_power_of_2(rows), triton.next_power_of_2(L)
    return tile_size(min(64, rows2), 4), tile_size(max(16, min(4096, L2)), max(16, min(MAX_BLOCK_L // 4, L2)))


def _grid(rows, L, block_r, block_l, op):
    grid = (triton.cdiv(rows, block_r), triton.cdiv(L, block_l))
    if grid[0] > MAX_GRID_0 or grid[1] > MAX_GRID_1:
        raise ValueError(f"{op}: the input is too large for one launch (grid {grid})")
    return grid


def cross_scan_fwd(x):
    """Contiguous x (B, C, H, W) -> y (B, 4, C, H*W) in the four scan orders, dtype of x."""
    _check_input(x, "cross_scan_fwd", "x", 4, "(B, C, H, W)")
    B, C, H, W = x.shape
    L = H * W
    y = torch.empty((B, 4, C, L), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_r, block_l = _blocks(B * C, L)
    grid = _grid(B * C, L, block_r, block_l, "cross_scan_fwd")
    launch(_cross_scan_fwd_kernel, grid, x.device, x, y, B * C, C, H, W, L, BLOCK_R=block_r, BLOCK_L=block_l)
    return y


def cross_merge_fwd(y):
    """Contiguous y (B, 4, C, H, W) -> x (B, C, H*W): the four directions summed per pixel, dtype of y."""
    _check_input(y, "cross_merge_fwd", "y", 5, "(B, 4, C, H, W)")
    if y.shape[1] != 4:
        raise ValueError(
            "cross_merge_fwd: expected y.shape[1] == 4 (one slice per scan direction) for y of shape "
            f"(B, 4, C, H, W), got shape {tuple(y.shape)}"
        )
    B, _, C, H, W = y.shape
    L = H * W
    x = torch.empty((B, C, L), dtype=y.dtype, device=y.device)
    if x.numel() == 0:
        return x
    block_r, block_l = _blocks(B * C, L)
    grid = _grid(B * C, L, block_r, block_l, "cross_merge_fwd")
    acc_dtype = tl.float64 if y.dtype == torch.float64 else tl.float32
    launch(_cross_merge_fwd_kernel, grid, y.device, y, x, B * C, C, H, W, L,
            BLOCK_R=block_r, BLOCK_L=block_l, ACC_DTYPE=acc_dtype)
    return x
