"""Tests of the MedMamba network (medkernels.models.medmamba) and its blocks (medkernels.nn.ss2d)."""

import pytest
import torch
import torch.nn.functional as F

import medkernels
from medkernels.models.medmamba import MedMamba, medmamba_b, medmamba_s, medmamba_t
from medkernels.nn.ss2d import SS2D, PatchMerging2D, SSConvSSM

from helpers.model_utils import assert_matches_manifest, fill_model, golden_case, golden_input

FACTORIES = {"medmamba_t": medmamba_t, "medmamba_s": medmamba_s, "medmamba_b": medmamba_b}


@pytest.mark.parametrize("name", list(FACTORIES), ids=list(FACTORIES))
def test_state_dict_matches_official_manifest(name):
    assert_matches_manifest(FACTORIES[name](num_classes=1000), name)


# ------------------------------------------------------------------------------------------- golden logits


@pytest.fixture(scope="module")
def golden_medmamba_t():
    case = golden_case("medmamba_t")
    model = fill_model(medmamba_t(num_classes=case["num_classes"])).eval()
    return model, golden_input(), torch.tensor(case["logits_float32"], dtype=torch.float32)


def test_golden_logits_medmamba_t(golden_medmamba_t, cpu_backend):
    model, x, expected = golden_medmamba_t
    if cpu_backend == "triton":
        # Triton's CPU interpreter walks the 3136-step stage-1 scans at a few ms per step: check the first
        # image only (images are independent in eval mode), which halves the minutes this takes.
        x, expected = x[:1], expected[:1]
    with medkernels.use_backend(cpu_backend), torch.no_grad():
        logits = model(x)
    assert logits.shape == expected.shape
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- SS2D against a plain re-statement


def _reference_ss2d(module, x):
    """SS2D re-stated from its definition in float64: flips/transposes and a step-by-step scan loop.

    x: (batch, H, W, d_model) -> (batch, H, W, d_model).
    """
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    d, n, r = module.d_inner, module.d_state, module.dt_rank
    x = x.double()
    batch, h, w, _ = x.shape

    xz = x @ p["in_proj.weight"].T
    u, z = xz[..., :d], xz[..., d:]
    u = F.conv2d(u.permute(0, 3, 1, 2), p["conv2d.weight"], p["conv2d.bias"], padding=1, groups=d)
    u = u * torch.sigmoid(u)  # (batch, d, h, w)

    row_major = u.reshape(batch, d, h * w)  # pixel (i, j) at i * w + j
    col_major = u.transpose(2, 3).reshape(batch, d, h * w)  # pixel (i, j) at j * h + i
    sequences = [row_major, col_major, torch.flip(row_major, [-1]), torch.flip(col_major, [-1])]

    total = torch.zeros(batch, d, h, w, dtype=torch.float64)
    for k, seq in enumerate(sequences):
        proj = torch.einsum("cd,bdl->bcl", p["x_proj_weight"][k], seq)
        dt_low, b_mat, c_mat = proj[:, :r], proj[:, r : r + n], proj[:, r + n :]
        dt = torch.einsum("dr,brl->bdl", p["dt_projs_weight"][k], dt_low) + p["dt_projs_bias"][k][:, None]
        dt = torch.log1p(torch.exp(dt))  # softplus
        a = -torch.exp(p["A_logs"][k * d : (k + 1) * d])  # (d, n)
        skip = p["Ds"][k * d : (k + 1) * d]
        state = torch.zeros(batch, d, n, dtype=torch.float64)
        outs = []
        for step in range(h * w):
            dt_l = dt[:, :, step, None]
            state = torch.exp(dt_l * a) * state + dt_l * b_mat[:, None, :, step] * seq[:, :, step, None]
            outs.append((state * c_mat[:, None, :, step]).sum(-1) + skip * seq[:, :, step])
        y = torch.stack(outs, dim=-1)  # (batch, d, L) in this direction's order
        if k >= 2:
            y = torch.flip(y, [-1])
        if k % 2 == 1:
            y = y.reshape(batch, d, w, h).transpose(2, 3)
        else:
            y = y.reshape(batch, d, h, w)
        total = total + y

    y = total.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (d,), p["out_norm.weight"], p["out_norm.bias"], eps=1e-5)
    y = y * (z * torch.sigmoid(z))
    return y @ p["out_proj.weight"].T


def _randomized_ss2d(d_model, seed):
    torch.manual_seed(seed)
    module = SS2D(d_model=d_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name == "A_logs":
                param.add_(0.2 * torch.randn(param.shape, generator=g))
            elif name in ("Ds", "out_norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=g))
            elif name == "dt_projs_bias":
                param.add_(0.5 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(0.4 * torch.randn(param.shape, generator=g))
    return module


@pytest.mark.parametrize("h,w", [(5, 7), (4, 4), (1, 6)], ids=["5x7", "4x4", "1x6"])
def test_ss2d_matches_plain_restatement(cpu_backend, h, w):
    module = _randomized_ss2d(d_model=8, seed=h * 100 + w).eval()
    x = torch.randn(2, h, w, 8, generator=torch.Generator().manual_seed(7))
    with medkernels.use_backend(cpu_backend), torch.no_grad():
        out = module(x)
    expected = _reference_ss2d(module, x)
    assert out.shape == (2, h, w, 8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_ss2d_directions_are_not_interchangeable():
    # Guard for the re-statement test itself: on a non-square grid, swapping the column-major direction's
    # parameters with the row-major one's must change the output.
    module = _randomized_ss2d(d_model=8, seed=11).eval()
    x = torch.randn(1, 5, 7, 8, generator=torch.Generator().manual_seed(3))
    expected = _reference_ss2d(module, x)
    with torch.no_grad():
        for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
            getattr(module, name)[[0, 1]] = getattr(module, name)[[1, 0]].clone()
        out = module(x)
    assert (out.double() - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ training


def test_training_step_small_input():
    torch.manual_seed(0)
    model = medmamba_t(num_classes=5).train()
    bn = model.layers[0].blocks[0].conv33conv33conv11[0]
    mean_before = bn.running_mean.clone()
    var_before = bn.running_var.clone()

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 3])
    logits = model(x)
    assert logits.shape == (2, 5)
    loss = F.cross_entropy(logits, target)
    loss.backward()

    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert model.head.weight.grad.abs().sum() > 0
    assert model.layers[0].blocks[0].self_attention.A_logs.grad.abs().sum() > 0

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, mean_before)
    assert not torch.equal(bn.running_var, var_before)


def test_eval_is_deterministic_and_drop_path_inactive():
    torch.manual_seed(0)
    model = MedMamba(num_classes=3, depths=[2, 2], dims=[16, 32], drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_patch_merging_odd_size_crops_silently(capsys):
    torch.manual_seed(0)
    merge = PatchMerging2D(dim=4)
    x = torch.randn(2, 5, 7, 4)
    with torch.no_grad():
        out = merge(x)
        expected = merge(x[:, :4, :6].contiguous())
    assert out.shape == (2, 2, 3, 8)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "shape,match",
    [((3, 64, 64), r"input 'x'.*4 dims"), ((2, 1, 64, 64), r"input 'x'.*3 channels"), ((2, 3, 64), r"input 'x'")],
    ids=["rank3", "one_channel", "rank3_batched"],
)
def test_medmamba_rejects_bad_input(shape, match):
    model = medmamba_t(num_classes=2)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    "make,shape,match",
    [
        (lambda: SS2D(d_model=8), (2, 4, 4), r"SS2D: input 'x'.*4 dims"),
        (lambda: SS2D(d_model=8), (2, 4, 4, 6), r"SS2D: input 'x'.*8 channels"),
        (lambda: SSConvSSM(hidden_dim=8), (2, 8, 4, 4, 1), r"SSConvSSM: input 'input'.*4 dims"),
        (lambda: SSConvSSM(hidden_dim=8), (2, 8, 4, 4), r"SSConvSSM: input 'input'.*8 channels"),
    ],
    ids=["ss2d_rank3", "ss2d_channels", "block_rank5", "block_channels_first"],
)
def test_blocks_reject_bad_input(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make()(torch.randn(*shape))
