"""HiFuse's global branch on token maps that are not multiples of the window, against an independent statement.

The contract (the official Swin Transformer's, which HiFuse's Swin block copies; the official HiFuse runs only at
224, whose 56/28/14/7 maps are window multiples, so it never pads): after ``norm1`` the H x W map is zero-padded at the bottom and the right to
Hp x Wp, multiples of the window; the padded tokens take part in the attention unmasked (their keys and values
are the qkv biases); a shifted block rolls the padded map by -s and adds -100 to the scores between tokens of one
window whose source positions wrapped around differently (the region mask, computed on the padded size); the
result is rolled back and cropped to H x W before ``fc1``.

The statement here follows that contract with explicit coordinates in float64: a loop over the windows of the
shifted frame, each token's source position computed as ((row + s) mod Hp, (col + s) mod Wp), the relative
position bias read from the table with a loop over token pairs, the mask from whether each token's row and
column wrapped. It uses none of medkernels.nn.hifuse's helpers (window_partition, window_reverse, torch.roll,
BasicLayer.shift_mask, relative_position_index), only the modules' parameters.
"""
import math

import pytest
import torch

import medkernels
from medkernels.models.hifuse import HiFuse
from medkernels.nn.hifuse import BasicLayer

MASKED = -100.0  # the official Swin's additive mask value (as good as -inf here: e**-100 is far below 1e-10)


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x, fc):
    out = x @ fc.weight.T
    return out if fc.bias is None else out + fc.bias


def _relative_bias(table, ws):
    """(heads, ws*ws, ws*ws): query (r, c) and key (r', c') of a window read table row
    (r - r' + ws - 1) * (2ws - 1) + (c - c' + ws - 1)."""
    n = ws * ws
    rows = []
    for i in range(n):
        for j in range(n):
            rows.append((i // ws - j // ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1))
    return table[rows].reshape(n, n, -1).permute(2, 0, 1)


def reference_global_block(block, x, H, W, shift):
    """One HiFuse GlobalBlock (eval mode) on x (batch, H*W, dim), written out window by window."""
    b, _, c = x.shape
    ws, heads = block.window_size, block.num_heads
    d = c // heads
    hp, wp = -(-H // ws) * ws, -(-W // ws) * ws
    padded = x.new_zeros(b, hp, wp, c)
    padded[:, :H, :W] = _layer_norm(x, block.norm1).reshape(b, H, W, c)
    attended = x.new_zeros(b, hp, wp, c)
    bias = _relative_bias(block.attn.relative_position_bias_table, ws)
    n = ws * ws
    for wr in range(hp // ws):
        for wc in range(wp // ws):
            # token t of this window sits at (wr*ws + t//ws, wc*ws + t%ws) of the shifted frame
            frame_r = [wr * ws + t // ws + shift for t in range(n)]
            frame_c = [wc * ws + t % ws + shift for t in range(n)]
            src_r = [r % hp for r in frame_r]
            src_c = [col % wp for col in frame_c]
            wrapped = [(frame_r[t] >= hp, frame_c[t] >= wp) for t in range(n)]
            mask = torch.tensor([[0.0 if wrapped[i] == wrapped[j] else MASKED for j in range(n)] for i in range(n)],
                                dtype=x.dtype)
            tokens = padded[:, src_r, src_c]  # (b, n, c)
            q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2)
                       for t in _linear(tokens, block.attn.qkv).split(c, dim=-1))
            scores = (q @ k.transpose(-2, -1)) * d ** -0.5 + bias + mask
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            attended[:, src_r, src_c] = _linear(out, block.attn.proj)
    y = attended[:, :H, :W].reshape(b, H * W, c)
    return x + _gelu(_linear(y, block.fc1))


def reference_patch_merging(merge, x, H, W):
    """PatchMerging: zero-pad odd H/W at the bottom/right, concatenate (0,0), (1,0), (0,1), (1,1) of each 2x2."""
    b, _, c = x.shape
    grid = x.new_zeros(b, H + H % 2, W + W % 2, c)
    grid[:, :H, :W] = x.reshape(b, H, W, c)
    parts = [grid[:, dr::2, dc::2] for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1))]
    merged = torch.cat(parts, dim=-1).reshape(b, -1, 4 * c)
    return _linear(_layer_norm(merged, merge.norm), merge.reduction)


def reference_basic_layer(layer, x, H, W):
    """BasicLayer: optional PatchMerging, then blocks with shift 0, ws//2, 0, ws//2, ..."""
    if layer.downsample is not None:
        x = reference_patch_merging(layer.downsample, x, H, W)
        H, W = (H + 1) // 2, (W + 1) // 2
    for i, block in enumerate(layer.blocks):
        x = reference_global_block(block, x, H, W, 0 if i % 2 == 0 else layer.window_size // 2)
    return x, H, W


def _randomise(module, seed):
    """Weights drawn from N(0, 1/fan_in), biases from N(0, 0.5^2), LayerNorm scales from 1 + N(0, 0.5^2), the bias
    table from N(0, 1): the position bias, the qkv biases (the padded tokens' keys and values) and the mask all
    move the output, and the activations stay of order one through a whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("relative_position_bias_table"):
                p.copy_(noise)
            elif p.dim() == 2:
                p.copy_(noise * p.shape[1] ** -0.5)
            elif name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.5 * noise)
            else:
                p.copy_(0.5 * noise)
    return module


def _tokens(b, H, W, c, seed):
    return torch.randn(b, H * W, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# (H, W, window): maps padded on both sides, on one side, smaller than the window, several windows a side with
# a window of 4 (interior windows and the shift's wrap in one map), and one that needs no padding (the control).
SIZES = [
    pytest.param(9, 9, 7, id="9x9-ws7"),
    pytest.param(13, 11, 7, id="13x11-ws7"),
    pytest.param(14, 11, 7, id="14x11-ws7"),
    pytest.param(5, 5, 7, id="5x5-ws7"),
    pytest.param(9, 10, 4, id="9x10-ws4"),
    pytest.param(14, 14, 7, id="14x14-ws7-unpadded"),
]


@pytest.fixture(scope="module")
def layers():
    """One two-block BasicLayer (dim 12, 3 heads) per window size, float64, eval mode."""
    built = {}
    for ws in (4, 7):
        torch.manual_seed(ws)
        built[ws] = _randomise(BasicLayer(dim=12, depth=2, num_heads=3, window_size=ws).double().eval(), seed=ws)
    return built


@pytest.mark.parametrize("index", [0, 1], ids=["unshifted-block", "shifted-block"])
@pytest.mark.parametrize("H, W, ws", SIZES)
def test_padded_window_attention_block_matches_loop_statement(layers, H, W, ws, index):
    """Each block of a BasicLayer, with the mask the layer builds, equals the window-by-window statement."""
    layer = layers[ws]
    block = layer.blocks[index]
    assert block.shift_size == (0 if index == 0 else ws // 2)
    x = _tokens(2, H, W, 12, seed=H * 100 + W)
    with torch.no_grad():
        got = block(x, H, W, layer.shift_mask(H, W, x.device, x.dtype))
        want = reference_global_block(block, x, H, W, shift=block.shift_size)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("H, W, ws", SIZES)
def test_padded_basic_layer_matches_loop_statement(layers, H, W, ws):
    """A whole BasicLayer (its own shift mask, both blocks) equals the statement."""
    layer = layers[ws]
    x = _tokens(1, H, W, 12, seed=H * 7 + W)
    with torch.no_grad():
        got, h, w = layer(x, H, W)
        want, _, _ = reference_basic_layer(layer, x, H, W)
    assert (h, w) == (H, W)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def narrow_hifuse():
    """HiFuse-Tiny's layout (depths 2, 2, 2, 2, heads 3, 6, 12, 24) at a quarter of its width, float64, eval mode,
    with its global branch randomised."""
    torch.manual_seed(0)
    model = HiFuse(num_classes=5, embed_dim=24, conv_dims=(24, 48, 96, 192)).double().eval()
    for i in range(1, 5):
        _randomise(getattr(model, f"layers{i}"), seed=i)
    return model


@pytest.mark.parametrize("backend", ["ref", "cpu"], ids=["cpu-ref", "cpu-cpu"])
def test_hifuse_off_224_matches_loop_statement_of_its_global_branch(narrow_hifuse, backend, monkeypatch):
    """On a 64x96 image (global maps 16x24, 8x12, 4x6, 2x3: every one padded, the last two smaller than the window)
    the network gives the logits it gives with every BasicLayer replaced by the statement; the local branch and
    the fusion blocks run on `backend` in both runs."""
    reason = medkernels.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    img = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with medkernels.use_backend(backend), torch.no_grad():
        got = narrow_hifuse(img)
        monkeypatch.setattr(BasicLayer, "forward", reference_basic_layer)
        want = narrow_hifuse(img)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
