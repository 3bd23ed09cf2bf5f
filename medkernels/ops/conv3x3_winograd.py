"""The ``cpu`` backend of :func:`medkernels.ops.conv3x3`: Winograd F(4x4, 3x3) on channels-last maps.

Each 4x4 block of outputs is computed from its 6x6 input tile as ``A^T [(G g G^T) . (B^T d B)] A``; summed over
input channels, the 36 elementwise products become 36 independent matrix products, ``(tiles, in) @ (in, out)``,
with 4x fewer multiply-adds than the direct convolution (csrc/conv3x3/winograd_f4x3.h has the transforms). The
transforms run in the extension (csrc/conv3x3/conv3x3_winograd_cpu.cpp); the products through oneDNN where
PyTorch has it (``linear_onednn.onednn_rows``), else ``torch.mm``. The backward is the same algorithm: the input
gradient is the forward convolution of the output gradient with the filter rotated by 180 degrees and transposed,
the filter gradient ``G^T [sum over tiles (A dy A^T) . (B^T d B)] G``.

The transformed tiles and filter chunks are written into a workspace of ``WORKSPACE_BYTES`` (64 MB) per thread that
is kept from call to call, in chunks of tiles and of output channels that fit it: a fresh allocation over
glibc's 32 MB mmap threshold is page-faulted in on every call, which on the VMs measured cost 0.25 ms a MB, and
smaller chunks make the products slower (benchmarks/NOTES.md). ``release_workspace()`` frees it.

Rounding: float32 throughout; the transforms scale values by up to 10x and back, so the result's error is
about 10x the direct convolution's (2e-5 of the largest output at HiFuse's widths against 2e-6; the tests hold
it to float32 tolerances against float64). Where the algorithm does not pay (other dtypes, maps of fewer than
``MIN_PIXELS`` pixels, filters with more than ``MAX_FILTER_ELEMENTS`` input x output channels, whose
transformed copy would be too large) the backend runs oneDNN's direct convolution (``F.conv2d``) on the maps as given.
"""
import os
import threading

import torch
import torch.nn.functional as F

from .. import _ext
from .linear_onednn import HAS_ONEDNN, onednn_rows

# MEDKERNELS_WINOGRAD=0 (read at import) turns Winograd off: every case then runs the direct convolution, for users
# who want the direct convolution's rounding (a tenth of Winograd's) at twice the time.
ENABLED = os.environ.get("MEDKERNELS_WINOGRAD", "1").strip() != "0"
# The transformed tiles and filters live in one workspace of at most this size per thread, kept between calls.
WORKSPACE_BYTES = 64 << 20
# Winograd only from this many output pixels a map (a 4x4 tile on a smaller map is mostly padding) ...
MIN_PIXELS = 16
# ... and for filters of at most this many (in x out) channel pairs: the transformed filter is 36 values a pair,
# computed again every call (training changes the weights), and past HiFuse's stage 3 (1152 x 1152) its
# products no longer pay for it (benchmarks/NOTES.md, issue 20).
MAX_FILTER_ELEMENTS = 1152 * 1152

_local = threading.local()


def _workspace(numel):
    """A float32 buffer of at least numel elements, this thread's, reused from call to call (a fresh one would be
    page-faulted in every call: 0.25 ms a MB on the VMs measured, more than the transforms themselves)."""
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.numel() < numel:
        _local.buffer = buf = torch.empty(numel, dtype=torch.float32)
    return buf


def release_workspace():
    """Free this thread's workspace (up to WORKSPACE_BYTES); the next Winograd call allocates it again."""
    _local.buffer = None


def uses_winograd(x, weight):
    """Whether the cpu backend computes conv3x3(x, weight) with Winograd (else the direct convolution)."""
    return (ENABLED and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.numel() > 0
            and x.shape[2] * x.shape[3] >= MIN_PIXELS and weight.shape[0] * weight.shape[1] <= MAX_FILTER_ELEMENTS)


def _ranges(n, step):
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _tiles(x):
    b, h, w = x.shape[:3]
    return b * ((h + 3) // 4) * ((w + 3) // 4)


def _split(budget, a_rows, a_row, b_rows, b_row):
    """Rows a chunk of two operands of 36 * row elements a row (a: a_rows rows, b: b_rows) that share `budget`
    elements: the smaller one whole when it fits in half, the other in what is left; else halves."""
    a_whole, b_whole = a_rows * a_row, b_rows * b_row
    if a_whole <= b_whole and a_whole <= budget // 2:
        return a_rows, max(1, (budget - a_whole) // b_row)
    if b_whole <= budget // 2:
        return max(1, (budget - b_whole) // a_row), b_rows
    return max(1, budget // 2 // a_row), max(1, budget // 2 // b_row)


def _products(v, u):
    """The 36 products v[e] @ u[e].T, each a contiguous (tiles, rows of u) matrix."""
    if HAS_ONEDNN:
        return [onednn_rows(v[e], u[e]) for e in range(36)]
    return list(torch.bmm(v, u.transpose(1, 2)).unbind(0))


def winograd_conv_rows(x_rows, weight, flip_transpose=False):
    """The 'same' 3x3 convolution of channels-last maps: x_rows (batch, H, W, in) contiguous, weight (out, in, 3, 3)
    contiguous -> (batch, H, W, out). With flip_transpose, the convolution with the filter rotated by 180 degrees
    and transposed (weight (in', out', 3, 3) read as (out', in', 3, 3)): the input gradient of the convolution."""
    ext = _ext.module()
    b, h, w, cin = x_rows.shape
    cout = weight.shape[1] if flip_transpose else weight.shape[0]
    tiles = _tiles(x_rows)
    tile_step, out_step = _split(WORKSPACE_BYTES // 4, tiles, 36 * cin, cout, 36 * cin)
    tile_chunks, out_chunks = _ranges(tiles, tile_step), _ranges(cout, out_step)
    u_start = 36 * cin * min(tiles, tile_step)
    work = _workspace(u_start + 36 * cin * min(cout, out_step))
    y = x_rows.new_empty(b, h, w, cout)
    for t0, t1 in tile_chunks:
        v = work[:36 * (t1 - t0) * cin].view(36, t1 - t0, cin)
        ext.winograd_input_transform_cpu(x_rows, t0, t1, v)
        for r0, r1 in out_chunks:
            u = work[u_start:u_start + 36 * (r1 - r0) * cin].view(36, r1 - r0, cin)
            if len(out_chunks) > 1 or t0 == 0:  # a whole filter is transformed once
                ext.winograd_filter_transform_cpu(weight, flip_transpose, r0, r1, u)
            ext.winograd_output_transform_cpu(_products(v, u), y, t0, r0)
    return y


def winograd_filter_grad(x_rows, dy_rows):
    """The filter gradient (out, in, 3, 3) of the 'same' 3x3 convolution of x_rows (batch, H, W, in) whose output
    gradient is dy_rows (batch, H, W, out), both channels-last contiguous."""
    ext = _ext.module()
    cin, cout = x_rows.shape[3], dy_rows.shape[3]
    tiles = _tiles(x_rows)
    # the tiles' transforms (v and z) and the summed products m (36 x out x in) share the workspace
    tile_step, out_step = _split(WORKSPACE_BYTES // 4, tiles, 36 * (cin + cout), cout, 36 * cin)
    tile_chunks, out_chunks = _ranges(tiles, tile_step), _ranges(cout, out_step)
    n_tiles, n_out = min(tiles, tile_step), min(cout, out_step)
    work = _workspace(36 * (n_tiles * (cin + cout) + n_out * cin))
    dw = x_rows.new_empty(cout, cin, 3, 3)
    transformed = None
    for o0, o1 in out_chunks:
        m = work[36 * n_tiles * (cin + cout):][:36 * (o1 - o0) * cin].view(36, o1 - o0, cin)
        for i, (t0, t1) in enumerate(tile_chunks):
            if transformed != (t0, t1):  # with one tile chunk, transformed once for every channel chunk
                v = work[:36 * (t1 - t0) * cin].view(36, t1 - t0, cin)
                z = work[v.numel():v.numel() + 36 * (t1 - t0) * cout].view(36, t1 - t0, cout)
                ext.winograd_input_transform_cpu(x_rows, t0, t1, v)
                ext.winograd_grad_output_transform_cpu(dy_rows, t0, t1, z)
                transformed = (t0, t1)
            if i == 0:
                torch.bmm(z[:, :, o0:o1].transpose(1, 2), v, out=m)
            else:
                m.baddbmm_(z[:, :, o0:o1].transpose(1, 2), v)
        ext.winograd_filter_grad_transform_cpu(m, dw, o0)
    return dw


def _rows(t):
    """A (batch, C, H, W) map as contiguous channels-last rows (batch, H, W, C) (a view when it already is)."""
    return t.permute(0, 2, 3, 1).contiguous()


def conv3x3_cpu_forward(x, weight):
    """(batch, out, H, W): channels-last from Winograd; F.conv2d's own layout from the direct convolution."""
    if not uses_winograd(x, weight):
        # oneDNN's direct convolution in the layout given: on NCHW maps with 2304 channels it was 1.6x faster
        # than on channels-last ones (benchmarks/NOTES.md), elsewhere the two were even
        return F.conv2d(x, weight, None, 1, 1)
    return winograd_conv_rows(_rows(x), weight.contiguous()).permute(0, 3, 1, 2)


def conv3x3_cpu_backward(grad, x, weight, needs_x, needs_weight):
    """(dx, dweight) of conv3x3_cpu_forward for the output gradient grad (None where not needed)."""
    if not uses_winograd(x, weight):
        dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                        1, [needs_x, needs_weight, False])
        return dx, dw
    g = _rows(grad)
    w = weight.contiguous()
    dx = winograd_conv_rows(g, w, flip_transpose=True).permute(0, 3, 1, 2) if needs_x else None
    dw = winograd_filter_grad(_rows(x), g) if needs_weight else None
    return dx, dw
