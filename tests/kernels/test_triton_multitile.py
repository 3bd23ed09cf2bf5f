"""Every Triton kernel on multi-tile grids: the public ops on the triton backend with small tiles
(kernels/_utils.tile_mode("small"): 2 elements a tiled dimension, 4 positions a scan chunk), against their
float64 references, outputs and every gradient elementwise.

Under the interpreter the launchers otherwise take one large tile, so with the tiny shapes of the other tests
the tile-coordinate arithmetic, the masks of a ragged last tile and the sums across tiles would run only on
a GPU. The shapes here are odd in every tiled dimension, and each test asserts from the recorded launches
that every tiled dimension really spans several tiles with a ragged last one, so that the test cannot
quietly fall back to one tile. Runs on a GPU too (small tiles compiled), or on CPU tensors under
TRITON_INTERPRET=1."""
import importlib
import math
import os

import pytest
import torch

import medkernels
from medkernels import ops
from medkernels.ops.cross_scan_ref import cross_merge_ref, cross_scan_ref
from medkernels.ops.depthwise_conv2d_layernorm_ref import depthwise_conv2d_layernorm_ref
from medkernels.ops.depthwise_conv2d_ref import depthwise_conv2d_ref
from medkernels.ops.hff_attention_ref import hff_channel_attention_ref, hff_spatial_attention_ref
from medkernels.ops.hff_attention_tail_ref import hff_attention_tail_ref
from medkernels.ops.selective_scan_ref import selective_scan_ref
from medkernels.ops.ss2d_scan_ref import ss2d_scan_ref

pytest.importorskip("triton")

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)
if medkernels.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {medkernels.unavailable_reason('triton')}", allow_module_level=True)

utils = importlib.import_module("medkernels.kernels._utils")

EPS32 = torch.finfo(torch.float32).eps
# (rtol, atol relative to the largest reference value, at least 1): float32 kernels against float64
# references; the worst element here is off by under 2 eps (of |reference| + that scale), so 16 eps is margin
TOLERANCES = {torch.float32: (16 * EPS32, 16 * EPS32)}

# The tiled dimensions of each kernel: (name, its extent from the launch's arguments, the constexpr that tiles
# it). A dimension is tiled by the grid or by a loop inside the program; either way a tile edge is crossed.
def _dim(name, *extent, block):
    """A tiled dimension: its name, its extent (the product of the launch arguments named) and its constexpr."""
    return (name, lambda a: math.prod(a[e] for e in extent), block)


_ROWS_PIXELS = (_dim("rows", "R", block="BLOCK_R"), _dim("pixels", "HW", block="BLOCK_P"))
_CHANNELS_PIXELS = (_dim("channels", "C", block="BLOCK_C"), _dim("pixels", "HW", block="BLOCK_P"))
_SCAN = (_dim("channels", "Dim", block="BLOCK_D"), _dim("positions", "L", block="CHUNK_L"))
_CONV = (_dim("pixels", "Ho", "Wo", block="BLOCK_P"), _dim("channels", "C", block="BLOCK_C"))
_CROSS = (_dim("rows", "rows", block="BLOCK_R"), _dim("pixels", "L", block="BLOCK_L"))
_MAP = (_dim("pixels", "H", "W", block="BLOCK_P"),)
_TAIL = (_dim("g channels", "C2", block="BLOCK_C"), _dim("l channels", "C1", block="BLOCK_C"),
         _dim("x_f channels", "Ci", block="BLOCK_C"), _dim("pixels", "HW", block="BLOCK_P"))
TILED = {
    "_cross_scan_fwd_kernel": _CROSS,
    "_cross_merge_fwd_kernel": _CROSS,
    "_selective_scan_fwd_kernel": _SCAN,
    "_selective_scan_bwd_kernel": _SCAN,
    "_ss2d_scan_fwd_kernel": _SCAN,
    "_ss2d_scan_bwd_kernel": _SCAN,
    "_fwd_kernel": _CONV,
    "_bwd_gz_kernel": _CONV,
    "_bwd_gx_kernel": (_dim("pixels", "H", "W", block="BLOCK_P"), _dim("channels", "C", block="BLOCK_C")),
    "_ln_fwd_kernel": _CONV[:1],  # the LayerNorm's tile holds all channels
    "_ln_bwd_gz_kernel": _CONV[:1],
    "_channel_pool_kernel": _CHANNELS_PIXELS,
    "_channel_dot_kernel": _CHANNELS_PIXELS,
    "_pixel_pool_kernel": _ROWS_PIXELS,
    "_pixel_dot_kernel": _ROWS_PIXELS,
    "_apply_gate_kernel": _ROWS_PIXELS,
    "_gate_input_grad_kernel": _ROWS_PIXELS,
    "_map_conv_kernel": _MAP,
    "_map_conv_bwd_kernel": _MAP,
    "_tail_fwd_kernel": _TAIL,
    "_tail_bwd_kernel": _TAIL,
}


def _assert_multi_tile(launches, expected_kernels, full_tiles=()):
    """Each expected kernel was launched, and in every launch every tiled dimension spans more than one tile
    with a ragged last tile (except the dimensions named in full_tiles, whose tiles divide them by design)."""
    names = [launch.kernel.__name__ for launch in launches]
    assert set(names) == set(expected_kernels), f"launched {sorted(set(names))}, expected {sorted(expected_kernels)}"
    for name, launch in zip(names, launches):
        values = dict(zip(launch.kernel.arg_names, launch.args), **launch.meta)
        for dim, extent_of, block_name in TILED[name]:
            extent, block = extent_of(values), values[block_name]
            assert extent > block, f"{name}: {dim} ({extent}) in one tile of {block}"
            if dim not in full_tiles:
                assert extent % block != 0, f"{name}: {dim} ({extent}) has no ragged last tile of {block}"


def _assert_close(what, got, exp, dtype):
    rtol, atol = TOLERANCES[dtype]
    exp = exp.detach().double()
    got = got.detach().cpu().double()
    scale = max(exp.abs().max().item(), 1.0)
    torch.testing.assert_close(got, exp, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _check(op, ref, tensors, dtype, seed=0):
    """op(**tensors) on the triton backend with small tiles against ref(**tensors) in float64: every output and
    the gradient of every tensor for random cotangents. Returns the recorded launches."""
    leaves = {k: t.to(DEVICE, dtype).requires_grad_() for k, t in tensors.items()}
    ref_leaves = {k: t.to(dtype).double().requires_grad_() for k, t in tensors.items()}  # the same values
    with medkernels.use_backend("triton"), utils.tile_mode("small"), utils.record_launches() as launches:
        out = op(**leaves)
        out = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(seed + 1)
        cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
        cotangents_in = [c.to(DEVICE, o.dtype) for c, o in zip(cotangents, out)]
        grads = torch.autograd.grad(out, list(leaves.values()), cotangents_in)
    exp = ref(**ref_leaves)
    exp = exp if isinstance(exp, tuple) else (exp,)
    exp_grads = torch.autograd.grad(exp, list(ref_leaves.values()), cotangents)
    for i, (o, e) in enumerate(zip(out, exp)):
        _assert_close(f"output {i}", o, e, dtype)
    for name, gr, e in zip(leaves, grads, exp_grads):
        _assert_close(f"d/d {name}", gr, e, dtype)
    return launches


def _randn(*shape, gen, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(*shape, gen, scale=1.0):
    return scale * torch.rand(*shape, generator=gen, dtype=torch.float64)


DTYPES = [pytest.param(torch.float32, id="float32")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_scan_and_merge_multi_tile(dtype):
    """cross_scan and cross_merge (each the other's backward): 9 rows (b, c) by 15 pixels of a 3 x 5 image."""
    gen = torch.Generator().manual_seed(0)
    launches = _check(ops.cross_scan, cross_scan_ref, {"x": _randn(3, 3, 3, 5, gen=gen)}, dtype)
    launches += _check(ops.cross_merge, cross_merge_ref, {"y": _randn(3, 4, 3, 3, 5, gen=gen)}, dtype)
    _assert_multi_tile(launches, {"_cross_scan_fwd_kernel", "_cross_merge_fwd_kernel"})


def _scan_tensors(batch, dim, L, n, groups, gen, optionals):
    t = {"u": _randn(batch, dim, L, gen=gen), "delta": _rand(batch, dim, L, gen=gen, scale=0.5),
         "A": -torch.exp(_randn(dim, n, gen=gen, scale=0.5)), "B": _randn(batch, groups, n, L, gen=gen),
         "C": _randn(batch, groups, n, L, gen=gen)}
    if optionals:
        t.update(D=_randn(dim, gen=gen), z=_randn(batch, dim, L, gen=gen), delta_bias=_randn(dim, gen=gen, scale=0.3))
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "groups, dim, optionals",
    [pytest.param(1, 5, True, id="ungrouped-5ch-all-optionals"), pytest.param(2, 8, False, id="2groups-8ch-bare")],
)
def test_selective_scan_multi_tile(dtype, groups, dim, optionals):
    """selective_scan over 9 positions (three chunks of 4, the last ragged) and 5 channels (blocks of 2) or two
    groups of 4 (two blocks a group: blocks never straddle groups, so they divide them); with every optional
    input, softplus and d last_state, or with none."""
    gen = torch.Generator().manual_seed(0)
    tensors = _scan_tensors(2, dim, 9, 3, groups, gen, optionals)

    def op(**t):
        return ops.selective_scan(**t, delta_softplus=optionals, return_last_state=optionals)

    def ref(**t):
        out, last = selective_scan_ref(**t, delta_softplus=optionals)
        return (out, last) if optionals else out

    launches = _check(op, ref, tensors, dtype)
    _assert_multi_tile(launches, {"_selective_scan_fwd_kernel", "_selective_scan_bwd_kernel"},
                       full_tiles=() if groups == 1 else ("channels",))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ss2d_scan_multi_tile(dtype):
    """ss2d_scan over a 2 x 5 image (10 positions: chunks of 4, the last ragged) and 3 channels, four
    directions."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, H, W, n = 2, 3, 2, 5, 3
    tensors = {"u": _randn(batch, dim, H, W, gen=gen),
               "delta": _rand(batch, 4, dim, H, W, gen=gen, scale=0.5),
               "A": -torch.exp(_randn(4 * dim, n, gen=gen, scale=0.5)), "B": _randn(batch, 4, n, H, W, gen=gen),
               "C": _randn(batch, 4, n, H, W, gen=gen), "D": _randn(4 * dim, gen=gen),
               "delta_bias": _randn(4 * dim, gen=gen, scale=0.3)}
    launches = _check(lambda **t: ops.ss2d_scan(**t, delta_softplus=True),
                      lambda **t: ss2d_scan_ref(**t, delta_softplus=True), tensors, dtype)
    _assert_multi_tile(launches, {"_ss2d_scan_fwd_kernel", "_ss2d_scan_bwd_kernel"})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "H, W, stride, activation, bias",
    [pytest.param(3, 5, 1, "silu", True, id="3x5-stride1-silu-bias"),
     pytest.param(5, 5, 2, None, False, id="5x5-stride2-plain")],
)
def test_depthwise_conv2d_multi_tile(dtype, H, W, stride, activation, bias):
    """depthwise_conv2d 3 x 3 over 3 channels: output pixels 15 (stride 1) or 9 (stride 2), input pixels 15 or
    25; with an activation (the backward's d loss / d z kernel stores z's gradient) or without."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"x": _randn(2, 3, H, W, gen=gen), "weight": _randn(3, 1, 3, 3, gen=gen, scale=0.5)}
    if bias:
        tensors["bias"] = _randn(3, gen=gen)

    def op(**t):
        return ops.depthwise_conv2d(**t, stride=stride, padding=1, activation=activation)

    def ref(x, weight, bias=None):
        return depthwise_conv2d_ref(x, weight, bias, stride, 1, activation or "none")

    launches = _check(op, ref, tensors, dtype)
    _assert_multi_tile(launches, {"_fwd_kernel", "_bwd_gz_kernel", "_bwd_gx_kernel"})


@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise_conv2d_layernorm_multi_tile(dtype):
    """depthwise_conv2d_layernorm 3 x 3 over 5 channels of a 3 x 5 image: 15 pixels in tiles of 2 (each tile
    holds all channels, the LayerNorm's axis; the input gradient's kernel tiles the channels by 2)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"x": _randn(2, 5, 3, 5, gen=gen), "weight": _randn(5, 1, 3, 3, gen=gen, scale=0.5),
               "bias": _randn(5, gen=gen), "ln_weight": 1 + _randn(5, gen=gen, scale=0.2),
               "ln_bias": _randn(5, gen=gen, scale=0.2)}

    def ref(x, weight, bias, ln_weight, ln_bias):
        return depthwise_conv2d_layernorm_ref(x, weight, bias, ln_weight, ln_bias, 1, 1, 1e-5)

    launches = _check(lambda **t: ops.depthwise_conv2d_layernorm(**t, eps=1e-5, padding=1), ref, tensors, dtype)
    _assert_multi_tile(launches, {"_ln_fwd_kernel", "_ln_bwd_gz_kernel", "_bwd_gx_kernel"})


@pytest.mark.parametrize("dtype", DTYPES)
def test_hff_spatial_and_channel_attention_multi_tile(dtype):
    """hff_spatial_attention (7 x 7 map convolution, BatchNorm on batch statistics) and hff_channel_attention
    on x of 3 images x 5 channels x 3 x 5 pixels: 15 (b, c) rows, 5 channels and 15 pixels in tiles of 2."""
    gen = torch.Generator().manual_seed(0)
    x = _randn(3, 5, 3, 5, gen=gen)
    spatial = {"x": x, "conv_weight": _randn(1, 2, 7, 7, gen=gen, scale=0.2),
               "bn_weight": 1 + _randn(1, gen=gen, scale=0.2), "bn_bias": _randn(1, gen=gen, scale=0.2)}

    def spatial_op(x, conv_weight, bn_weight, bn_bias):
        return ops.hff_spatial_attention(x, conv_weight, bn_weight, bn_bias, None, None, True)

    def spatial_ref(x, conv_weight, bn_weight, bn_bias):
        return hff_spatial_attention_ref(x, conv_weight, bn_weight, bn_bias, None, None, True, 1e-5)[0]

    launches = _check(spatial_op, spatial_ref, spatial, dtype)
    channel = {"x": x, "fc1_weight": _randn(2, 5, gen=gen, scale=0.5), "fc2_weight": _randn(5, 2, gen=gen, scale=0.5)}
    launches += _check(ops.hff_channel_attention, hff_channel_attention_ref, channel, dtype)
    _assert_multi_tile(launches, {"_channel_pool_kernel", "_map_conv_kernel", "_apply_gate_kernel",
                                  "_channel_dot_kernel", "_map_conv_bwd_kernel", "_gate_input_grad_kernel",
                                  "_pixel_pool_kernel", "_pixel_dot_kernel"})


@pytest.mark.parametrize("dtype", DTYPES)
def test_hff_attention_tail_multi_tile(dtype):
    """hff_attention_tail (the gates in gate form, the fusion tail's LayerNorm, the gates' backward adding into
    the tail's dl and dg) with l, g, x_f of 3, 5 and 3 channels over 3 x 5 pixels, 3 images."""
    gen = torch.Generator().manual_seed(0)
    C1, C2, Ci, total = 3, 5, 3, 11
    tensors = {"l": _randn(3, C1, 3, 5, gen=gen), "g": _randn(3, C2, 3, 5, gen=gen),
               "x_f": _randn(3, Ci, 3, 5, gen=gen), "conv_weight": _randn(1, 2, 7, 7, gen=gen, scale=0.2),
               "bn_weight": 1 + _randn(1, gen=gen, scale=0.2), "bn_bias": _randn(1, gen=gen, scale=0.2),
               "fc1_weight": _randn(2, C2, gen=gen, scale=0.5), "fc2_weight": _randn(C2, 2, gen=gen, scale=0.5),
               "ln_weight": 1 + _randn(total, gen=gen, scale=0.2), "ln_bias": _randn(total, gen=gen, scale=0.2)}

    def op(l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias):
        return ops.hff_attention_tail(l, g, x_f, conv_weight, bn_weight, bn_bias, None, None, True, fc1_weight,
                                      fc2_weight, ln_weight, ln_bias, bn_eps=1e-5, ln_eps=1e-6)

    def ref(l, g, x_f, conv_weight, bn_weight, bn_bias, fc1_weight, fc2_weight, ln_weight, ln_bias):
        return hff_attention_tail_ref(l, g, x_f, conv_weight, bn_weight, bn_bias, None, None, True, 1e-5, fc1_weight,
                                      fc2_weight, ln_weight, ln_bias, 1e-6)[0]

    launches = _check(op, ref, tensors, dtype)
    _assert_multi_tile(launches, {"_channel_pool_kernel", "_map_conv_kernel", "_pixel_pool_kernel",
                                  "_tail_fwd_kernel", "_tail_bwd_kernel", "_map_conv_bwd_kernel",
                                  "_gate_input_grad_kernel"})
