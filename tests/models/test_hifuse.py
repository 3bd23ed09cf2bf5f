"""Tests of the HiFuse network (medkernels.models.hifuse) and its blocks (medkernels.nn.hifuse)."""
import re

import pytest
import torch

import medkernels
from medkernels.models.hifuse import HiFuse, hifuse_base, hifuse_small, hifuse_tiny
from medkernels.nn.hifuse import GlobalBlock, HFFBlock, LocalBlock

from helpers.model_utils import assert_matches_manifest, fill_model, golden_case, golden_input

FACTORIES = {"hifuse_tiny": hifuse_tiny, "hifuse_small": hifuse_small, "hifuse_base": hifuse_base}

# Parameters the official forward pass never touches (kept only so official checkpoints load).
UNUSED_PARAMETER = re.compile(r"^(norm|head)\.|^fu1\.(Updim|norm1|W3)\.|^fu[234]\.(norm2|W)\.|^layers\d\.blocks\.\d+\.norm2\.")


@pytest.mark.parametrize("name", list(FACTORIES), ids=list(FACTORIES))
def test_state_dict_matches_official_manifest(name):
    assert_matches_manifest(FACTORIES[name](num_classes=1000), name)


def test_relative_position_index_is_a_correct_persistent_buffer():
    model = hifuse_tiny(num_classes=7)
    index = model.state_dict()["layers1.blocks.0.attn.relative_position_index"]
    assert index.shape == (49, 49) and index.dtype == torch.int64
    # token (r, c) attending to (r', c') reads row ((r - r' + 6) * 13 + (c - c' + 6)) of the table
    assert index[0, 0] == 6 * 13 + 6
    assert index[0, 48] == 0  # (0,0) -> (6,6)
    assert index[48, 0] == 12 * 13 + 12  # (6,6) -> (0,0)
    assert index.min() == 0 and index.max() == 13 * 13 - 1


# ----------------------------------------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden_hifuse_tiny():
    case = golden_case("hifuse_tiny")
    model = fill_model(hifuse_tiny(num_classes=case["num_classes"])).eval()
    return model, torch.tensor(case["logits_float32"])


def test_golden_logits_hifuse_tiny(golden_hifuse_tiny, cpu_backend):
    model, expected = golden_hifuse_tiny
    with medkernels.use_backend(cpu_backend), torch.no_grad():
        logits = model(golden_input())
    assert logits.shape == expected.shape
    # tolerance from tests/data (README of the reference files): about 1e-4 absolute
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- input sizes


@pytest.fixture(scope="module")
def tiny_eval_model():
    torch.manual_seed(0)
    return hifuse_tiny(num_classes=5).eval()


@pytest.mark.parametrize("size", [(160, 160), (256, 256), (192, 128)], ids=["160x160", "256x256", "192x128"])
def test_other_input_sizes_give_finite_logits(tiny_eval_model, size):
    model = tiny_eval_model
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(200, 200), (224, 100)], ids=["200x200", "224x100"])
def test_input_not_divisible_by_32_is_rejected(tiny_eval_model, size):
    model = tiny_eval_model
    x = torch.zeros(1, 3, *size)
    with pytest.raises(ValueError, match=rf"\(1, 3, {size[0]}, {size[1]}\)"):
        model(x)


# ----------------------------------------------------------------------------------------------- training


def test_training_step_gradients_and_batchnorm_stats():
    torch.manual_seed(0)
    model = hifuse_tiny(num_classes=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".bn" in k or "bn1" in k}
    x = torch.randn(2, 3, 160, 160)
    target = torch.tensor([1, 3])

    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()

    for name, p in model.named_parameters():
        if UNUSED_PARAMETER.search(name):
            assert p.grad is None, f"{name} is not used by the official forward pass but received a gradient"
        else:
            assert p.grad is not None, f"{name} received no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"

    state = model.state_dict()
    for i in range(1, 5):
        for bn in ("spatial.bn", "W_l.bn", "W_g.bn", "residual.bn1", "residual.conv3.bn"):
            prefix = f"fu{i}.{bn}"
            assert state[f"{prefix}.num_batches_tracked"].item() == 1, prefix
            assert not torch.equal(state[f"{prefix}.running_mean"], before[f"{prefix}.running_mean"]), prefix
            assert not torch.equal(state[f"{prefix}.running_var"], before[f"{prefix}.running_var"]), prefix
    # the first fusion block has no previous fused feature: its Updim never runs
    assert state["fu1.Updim.bn.num_batches_tracked"].item() == 0
    assert state["fu2.Updim.bn.num_batches_tracked"].item() == 1


def test_eval_mode_leaves_batchnorm_stats_alone(tiny_eval_model):
    model = tiny_eval_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed in eval mode"


# ----------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("with_previous", [False, True], ids=["first-block", "with-previous-fused"])
def test_hff_block_shapes(with_previous):
    torch.manual_seed(0)
    block = HFFBlock(ch_1=32, ch_2=32, r_2=16, ch_int=32, ch_out=32).eval()
    l, g = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    f = torch.randn(2, 16, 12, 12) if with_previous else None
    with torch.no_grad():
        out = block(l, g, f)
    assert out.shape == (2, 32, 6, 6)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shift", [0, 3], ids=["no-shift", "shift-3"])
def test_global_block_on_map_smaller_than_window(shift):
    # 5x5 tokens are zero-padded to one 7x7 window and cropped back
    from medkernels.nn.hifuse import BasicLayer

    torch.manual_seed(0)
    layer = BasicLayer(dim=24, depth=2, num_heads=3, window_size=7).eval()
    block = GlobalBlock(24, 3, window_size=7, shift_size=shift).eval()
    x = torch.randn(2, 25, 24)
    with torch.no_grad():
        out = block(x, 5, 5, layer.shift_mask(5, 5, x.device, x.dtype))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_local_block_shape():
    block = LocalBlock(16).eval()
    x = torch.randn(1, 16, 9, 7)
    with torch.no_grad():
        assert block(x).shape == x.shape


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError):
        HiFuse(num_classes=2, conv_dims=(96, 192, 384, 700))
