"""medkernels.nn.HFFBlock (fused attention gates and tail) on every backend against the official block's
forward written in plain PyTorch on the same modules, in float64: outputs, input and parameter gradients and
the BatchNorm running statistics after a training step, at the four HiFuse widths."""
import copy

import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels.nn import HFFBlock

from helpers.hff_utils import assert_close_elementwise, assert_close_scaled, rand, randn

WIDTHS = [96, 192, 384, 768]  # hifuse: ch_1 = ch_2 = ch_int = ch_out = C, r_2 = 16
BATCH, H, W = 2, 5, 3


def official_forward(block, l, g, f):
    """HFF_block.forward of the official HiFuse main_model.py, with the block's own modules."""
    w_local, w_global = block.W_l(l), block.W_g(g)
    if f is not None:
        w_f = F.avg_pool2d(block.Updim(f), 2, 2)
        shortcut = w_f
        x_f = block.gelu(block.W3(block.norm1(torch.cat([w_f, w_local, w_global], 1))))
    else:
        shortcut = 0
        x_f = block.gelu(block.W(block.norm2(torch.cat([w_local, w_global], 1))))
    pooled = torch.cat([torch.max(l, 1, keepdim=True)[0], torch.mean(l, 1, keepdim=True)], 1)
    l = torch.sigmoid(block.spatial(pooled)) * l
    se_max, se_avg = block.se(F.adaptive_max_pool2d(g, 1)), block.se(F.adaptive_avg_pool2d(g, 1))
    g = torch.sigmoid(se_max + se_avg) * g
    fuse = block.residual(block.norm3(torch.cat([g, l, x_f], 1)))
    return shortcut + block.drop_path(fuse)


def _randomized_block(width, r_2=16):
    torch.manual_seed(width)
    block = HFFBlock(width, width, r_2, width, width)
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(block.state_dict().items())):
            if name.endswith("running_mean"):
                t.copy_(randn(t.shape, i, torch.float32, scale=0.2))
            elif name.endswith("running_var"):
                t.copy_(rand(t.shape, i, torch.float32, low=0.5, high=1.5))
            elif t.dim() == 1 and t.is_floating_point():  # norm and BatchNorm weights and biases
                t.copy_(randn(t.shape, i, torch.float32, scale=0.2, shift=1.0 if name.endswith("weight") else 0.0))
    return block


@pytest.fixture(scope="module")
def blocks():
    """width -> (the float32 block, its initial buffers); built once (the 768-wide IRMLP holds ~76M
    parameters). A test restores the buffers (BatchNorm statistics) it changed."""
    return {}


@pytest.fixture(scope="module")
def references():
    """(width, with_f, training) -> float64 results of the official forward."""
    return {}


def _inputs(width, with_f):
    l = randn((BATCH, width, H, W), 1, scale=1.5)
    g = randn((BATCH, width, H, W), 2, shift=0.2)
    f = randn((BATCH, width // 2, 2 * H, 2 * W), 3) if with_f else None
    return [l, g, f]


def _checked_parameters(block, width):
    """All parameters at the smallest width; outside the IRMLP (``residual``: dense convolutions, plain PyTorch,
    whose weight gradients cost seconds at 3 * 768 channels) at the others."""
    return {k: v for k, v in block.named_parameters() if width == WIDTHS[0] or not k.startswith("residual.")}


def _step(block, forward, inputs, training, all_parameters=False, cotangent_dtype=None):
    """One forward and backward; returns (output, input grads, {param: grad}, {buffer: value after}). The
    cotangent is seeded, in the output's dtype (with values rounded to `cotangent_dtype` when given)."""
    block.train(training)
    inputs = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = forward(block, *inputs)
    params = dict(block.named_parameters()) if all_parameters else _checked_parameters(block, block.norm3.weight.shape[0] // 3)
    leaves = [t for t in inputs if t is not None] + list(params.values())
    cot = randn(out.shape, 4, cotangent_dtype or out.dtype).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, cot, allow_unused=True)
    n = sum(t is not None for t in inputs)
    return out, grads[:n], dict(zip(params, grads[n:])), {k: v.clone() for k, v in block.named_buffers()}


def _reference(block, initial, references, width, with_f, training):
    key = (width, with_f, training)
    if key not in references:
        block64 = copy.deepcopy(block).double()
        block64.load_state_dict(initial, strict=False)
        references[key] = _step(block64, official_forward, _inputs(width, with_f), training)
    return references[key]


# per dtype: (output, input-gradient, parameter-gradient) tolerance relative to each tensor's largest magnitude.
# Scaled by the largest entry, not elementwise: at these widths every result is a sum over thousands of terms (the
# IRMLP's dense 3x3 convolutions over 3 C channels, the LayerNorms over 2-3 C, the parameter gradients over every
# pixel as well), whose float32 rounding grows with the terms, not with the entry it lands in.
# test_hff_block_small_float32_holds_elementwise checks a block small enough to hold entry by entry.
TOLERANCES = {torch.float32: (1e-4, 1e-4, 2e-4), torch.float64: (1e-10, 1e-10, 1e-10)}


def _cases():
    """Every width on every backend, and with or without the previous fused feature f, in training and in eval
    mode, all four combinations across the widths (two per width, to keep the 3 * 768-channel IRMLP's cost)."""
    pairs = [((True, True), (False, False)), ((False, True), (True, False))]
    cases = []
    for i, width in enumerate(WIDTHS):
        for with_f, training in pairs[i % 2]:
            name = f"{width}-{'with-f' if with_f else 'first-block'}-{'train' if training else 'eval'}"
            cases.append(pytest.param(width, with_f, training, id=name))
    return cases


@pytest.mark.parametrize("width, with_f, training", _cases())
def test_hff_block_matches_official(device_backend, blocks, references, width, with_f, training):
    device, backend = device_backend
    if width not in blocks:
        block = _randomized_block(width)
        blocks[width] = (block, {k: v.clone() for k, v in block.named_buffers()})
    block, initial = blocks[width]
    dtype = torch.float64 if (backend == "cpu" and width == WIDTHS[0]) else torch.float32
    expected = _reference(block, initial, references, width, with_f, training)
    if device.type != "cpu" or dtype != torch.float32:
        block = copy.deepcopy(block).to(device=device, dtype=dtype)
    inputs = [None if t is None else t.to(device=device, dtype=dtype) for t in _inputs(width, with_f)]
    try:
        with medkernels.use_backend(backend):
            got = _step(block, lambda b, *a: b(*a), inputs, training)
    finally:
        block.load_state_dict(initial, strict=False)
    out_tol, input_tol, param_tol = TOLERANCES[dtype]
    assert got[0].dtype == dtype
    assert_close_scaled(got[0], expected[0], out_tol, "output")
    for name, a, b in zip("lgf", got[1], expected[1]):
        assert_close_scaled(a, b, input_tol, f"grad {name}")
    for name, b in expected[2].items():
        a = got[2][name]
        assert (a is None) == (b is None), f"{name}: gradient presence differs from the official block"
        if b is not None:
            assert_close_scaled(a, b, param_tol, f"grad {name}")
    for name, b in expected[3].items():
        assert_close_scaled(got[3][name], b, out_tol, f"buffer {name}")
    spatial_stats_moved = not torch.equal(expected[3]["spatial.bn.running_mean"], initial["spatial.bn.running_mean"].double())
    assert spatial_stats_moved == training


@pytest.mark.parametrize("with_f, training", [(True, True), (False, False)], ids=["with-f-train", "first-block-eval"])
def test_hff_block_small_float32_holds_elementwise(cpu_backend, with_f, training):
    """A 16-wide float32 block (4 hidden units in the channel MLP) against the official forward in float64 on the
    same values, every result entry by entry: float32's relative tolerance (hff_utils.ELEMENTWISE_TOLERANCES)
    with a floor of 2e-5 of each tensor's largest entry, for the biases in front of a training-mode BatchNorm:
    zero in exact arithmetic, their gradients are rounding only."""
    width = LOW_PRECISION_WIDTH
    block = _randomized_block(width, LOW_PRECISION_R)
    inputs = _inputs(width, with_f)
    expected = _step(copy.deepcopy(block).double(), official_forward, inputs, training, True)
    with medkernels.use_backend(cpu_backend):
        got = _step(copy.deepcopy(block), lambda b, *a: b(*a), [None if t is None else t.float() for t in inputs],
                    training, True)
    assert_close_elementwise(got[0], expected[0], "output", floor=2e-5)
    for name, a, b in zip("lgf", got[1], expected[1]):
        assert_close_elementwise(a, b, f"grad {name}", floor=2e-5)
    for name, b in expected[2].items():
        a = got[2][name]
        assert (a is None) == (b is None), f"{name}: gradient presence differs from the official block"
        if b is not None:
            assert_close_elementwise(a, b, f"grad {name}", floor=2e-5)
    for name, b in expected[3].items():
        if b.is_floating_point():
            assert_close_elementwise(got[3][name], b, f"buffer {name}", floor=2e-5)
        else:
            assert torch.equal(got[3][name], b), f"buffer {name}"


# float16 / bfloat16: (dtype, slack of the output, input gradients and buffers, slack of the parameter gradients).
# Everything but the fused attention tail is plain PyTorch in that dtype (the 1x1 convolutions and BatchNorms,
# LayerNorms, GELU, the IRMLP), whose roundings compound over the block, so each result is held to the error of the
# official forward run eagerly in the same dtype plus a slack, both relative to the largest magnitude of the
# float64 reference. Output, input gradients and running statistics: one epsilon of the dtype (one more rounding).
# Parameter gradients are sums over the batch's pixels of gradients that carry the surrounding layers' rounding
# noise, which two pipelines rounding at different places (the fused op once, eager PyTorch after every op) see
# differently; for BatchNorm parameters and the biases feeding a training-mode BatchNorm (zero in exact arithmetic)
# that noise does not average out: four epsilons (measured: at most 3.2).
_EPS16, _EPSBF16 = torch.finfo(torch.float16).eps, torch.finfo(torch.bfloat16).eps
LOW_PRECISION = [
    pytest.param((torch.float16, _EPS16, 4 * _EPS16), id="float16"),
    pytest.param((torch.bfloat16, _EPSBF16, 4 * _EPSBF16), id="bfloat16"),
]
LOW_PRECISION_WIDTH, LOW_PRECISION_R = 16, 4  # a small block: 4 hidden units in the channel MLP


def _relative_error(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).abs().max()) / max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("dtype_case", LOW_PRECISION)
@pytest.mark.parametrize("with_f, training", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["with-f-train", "first-block-train", "with-f-eval", "first-block-eval"])
def test_hff_block_low_precision(device_backend, dtype_case, with_f, training):
    """HFFBlock with float16/bfloat16 parameters, buffers and inputs against the official forward in float64 on the
    same rounded values (and the same rounded cotangent): output, input and parameter gradients, BatchNorm running
    statistics and batch counts; the results keep the block's dtype."""
    device, backend = device_backend
    dtype, slack, param_slack = dtype_case
    width = LOW_PRECISION_WIDTH
    block = _randomized_block(width, LOW_PRECISION_R).to(device=device, dtype=dtype)
    inputs = [None if t is None else t.to(device=device, dtype=dtype) for t in _inputs(width, with_f)]
    expected = _step(copy.deepcopy(block).cpu().double(), official_forward,
                     [None if t is None else t.cpu().double() for t in inputs], training, True, dtype)
    eager = _step(copy.deepcopy(block), official_forward, inputs, training, True)
    with medkernels.use_backend(backend):
        got = _step(copy.deepcopy(block), lambda b, *a: b(*a), inputs, training, True)

    def check(name, a, e, b, slack=slack):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype}, the eager block gives {e.dtype}"
        eager_err, err = _relative_error(e, b), _relative_error(a, b)
        assert err <= eager_err + slack, f"{name}: relative error {err:.3e} > eager's {eager_err:.3e} + {slack:.1e}"

    assert got[0].dtype == dtype
    check("output", got[0], eager[0], expected[0])
    for name, a, e, b in zip("lgf", got[1], eager[1], expected[1]):
        check(f"grad {name}", a, e, b)
    for name, b in expected[2].items():
        a, e = got[2][name], eager[2][name]
        assert (a is None) == (b is None), f"{name}: gradient presence differs from the official block"
        if b is not None:
            check(f"grad {name}", a, e, b, param_slack)
    for name, b in expected[3].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got[3][name].cpu(), b), f"buffer {name}"
        else:
            check(f"buffer {name}", got[3][name], eager[3][name], b)
    spatial_stats_moved = not torch.equal(got[3]["spatial.bn.running_mean"], block.spatial.bn.running_mean)
    assert spatial_stats_moved == training


def _spatial_bn_variant(block, variant):
    bn = block.spatial.bn
    if variant == "cumulative":  # momentum None: cumulative moving average over num_batches_tracked
        bn.momentum = None
    elif variant == "no-running-stats":  # batch statistics in eval mode too, no buffers
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    elif variant == "no-affine":
        bn.affine = False
        bn.weight = bn.bias = None
    return block


@pytest.mark.parametrize("variant", ["cumulative", "no-running-stats", "no-affine"])
def test_hff_block_spatial_batchnorm_variants(cpu_backend, variant):
    """The spatial BatchNorm's other nn.BatchNorm2d configurations behave as in the official forward, step after
    step: three training steps then an eval step, outputs and the BatchNorm's buffers (running statistics and
    num_batches_tracked) in float64."""
    block = _spatial_bn_variant(_randomized_block(LOW_PRECISION_WIDTH, LOW_PRECISION_R).double(), variant)
    official = copy.deepcopy(block)
    for step, training in enumerate((True, True, True, False)):
        inputs = [randn((BATCH, LOW_PRECISION_WIDTH, H, W), 10 + 3 * step + i, scale=1.0 + i) for i in range(2)]
        block.train(training)
        official.train(training)
        with medkernels.use_backend(cpu_backend):
            out = block(*inputs)
        expected = official_forward(official, *inputs, None)
        assert_close_scaled(out, expected, 1e-12, f"step {step}: output")
        for (name, a), (_, b) in zip(block.spatial.bn.named_buffers(), official.spatial.bn.named_buffers()):
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-12, atol=0), f"step {step}: {name} {a} != {b}"
