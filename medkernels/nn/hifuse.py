"""Building blocks of HiFuse (Huo et al., "HiFuse: Hierarchical multi-scale feature fusion network
for medical image classification").

The modules reproduce the official implementation (huoxiangzuo/HiFuse, ``main_model.py``) so that
its checkpoints load with ``load_state_dict(strict=True)`` and give the same outputs:

* parameter/buffer names and shapes follow the official modules (``dwconv``, ``pwconv``, ``W_l``,
  ``spatial.conv``, ``residual.conv1.conv`` ...), including sub-modules the official forward pass
  never uses (``GlobalBlock.norm2``; ``Updim``/``norm1``/``W3`` of the first fusion block);
* the official quirks are kept on purpose: ``IRMLP.conv1`` is a dense 3x3 convolution (the
  official wrapper drops its ``groups`` argument), ``PatchMerging`` is built with half the layer width and sits at the start
  of a Swin stage, and the Swin block replaces the MLP by a single ``Linear -> GELU``.

The fused attention gates and the depthwise convolution go through :mod:`medkernels.ops`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medkernels import ops as _ops

from .depthwise import DepthwiseConv2d
from .drop_path import DropPath
from .linear import Linear

__all__ = [
    "ChannelsFirstLayerNorm",
    "Conv",
    "IRMLP",
    "window_partition",
    "window_reverse",
    "WindowAttention",
    "GlobalBlock",
    "BasicLayer",
    "PatchEmbed",
    "PatchMerging",
    "LocalBlock",
    "HFFBlock",
]


# --------------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------------


def _maybe_drop_path(p):
    return DropPath(p) if p > 0.0 else nn.Identity()


def batch_norm_args(bn):
    """The :class:`medkernels.ops.BatchNormArgs` with which ``bn`` (an ``nn.BatchNorm2d``) would normalise now:
    batch statistics in training (or without running statistics), the momentum it would use, and, like its own
    forward, one more batch counted in ``num_batches_tracked`` when it tracks statistics in training."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_stats = not bn.training or bn.track_running_stats
    return _ops.BatchNormArgs(bn.weight, bn.bias, bn.running_mean if keep_stats else None,
                              bn.running_var if keep_stats else None, use_batch_stats, momentum, bn.eps)


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (batch, C, H, W) tensor (the official ``LayerNorm``
    with ``data_format="channels_first"``): biased variance, ``eps`` inside the square root.

    x: (batch, C, H, W) -> (batch, C, H, W). Parameters ``weight`` and ``bias``: (C,).
    """

    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(dim=1, keepdim=True)
        centred = x - mu
        var = centred.pow(2).mean(dim=1, keepdim=True)
        y = centred / torch.sqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Conv(nn.Module):
    """The official ``Conv`` wrapper: Conv2d (padding ``(k-1)//2``) -> optional BatchNorm2d ->
    optional ReLU. Sub-modules are named ``conv`` and ``bn``.

    Note: the official wrapper accepts a ``group`` argument but never forwards it to ``nn.Conv2d``;
    the convolution is therefore always dense, and this class has no groups argument at all.

    x: (batch, in_dim, H, W) -> (batch, out_dim, H', W').
    """

    def __init__(self, in_dim, out_dim, kernel_size=3, stride=1, bn=False, relu=True, bias=True):
        super().__init__()
        self.in_dim = in_dim
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_dim) if bn else None
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x):
        if x.shape[1] != self.in_dim:
            raise ValueError(f"Conv expects {self.in_dim} input channels, got input of shape {tuple(x.shape)}")
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class IRMLP(nn.Module):
    """Inverted residual MLP of the fusion block.

    y = gelu(conv1(x)) + x; y = bn1(y); y = gelu(conv2(y)); out = conv3(y)
    with conv1 a dense 3x3 conv (no bias), conv2 a 1x1 conv to 4*in_dim (no bias) and conv3 a
    1x1 conv to out_dim (no bias) followed by BatchNorm. The chain runs as one op
    (:func:`medkernels.ops.irmlp`); ``gelu`` is kept for the official module's structure.

    x: (batch, in_dim, H, W) -> (batch, out_dim, H, W).
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.conv1 = Conv(in_dim, in_dim, 3, relu=False, bias=False)
        self.conv2 = Conv(in_dim, in_dim * 4, 1, relu=False, bias=False)
        self.conv3 = Conv(in_dim * 4, out_dim, 1, relu=False, bias=False, bn=True)
        self.gelu = nn.GELU()
        self.bn1 = nn.BatchNorm2d(in_dim)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.conv1.in_dim:
            raise ValueError(f"IRMLP expects (batch, {self.conv1.in_dim}, H, W) input, got shape {tuple(x.shape)}")
        return _ops.irmlp(x, self.conv1.conv.weight, self.conv2.conv.weight, self.conv3.conv.weight,
                          batch_norm_args(self.bn1), batch_norm_args(self.conv3.bn))


# --------------------------------------------------------------------------------------------
# global (Swin) branch
# --------------------------------------------------------------------------------------------


def window_partition(x, window_size):
    """Cut (B, H, W, C) into non-overlapping windows: -> (B * H//ws * W//ws, ws, ws, C).

    H and W must be multiples of ``window_size``.
    """
    b, h, w, c = x.shape
    ws = window_size
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, ws, ws, c)


def window_reverse(windows, window_size, height, width):
    """Inverse of :func:`window_partition`: (B * nW, ws, ws, C) -> (B, height, width, C)."""
    ws = window_size
    n_win = (height // ws) * (width // ws)
    b = windows.shape[0] // n_win
    x = windows.view(b, height // ws, width // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(b, height, width, -1)


def _relative_position_index(wh, ww):
    """(wh*ww, wh*ww) int64 index into the (2wh-1)*(2ww-1) relative position bias table."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    flat = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    row = rel[..., 0] + (wh - 1)
    col = rel[..., 1] + (ww - 1)
    return row * (2 * ww - 1) + col


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    x: (num_windows * batch, N, dim) with N = wh * ww;
    mask: None or (num_windows, N, N) additive mask (0 / -100) for shifted windows.
    Returns (num_windows * batch, N, dim).
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if isinstance(window_size, int):
            window_size = (window_size, window_size)
        self.dim = dim
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(wh, ww))
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (bw, heads, N, head_dim)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (bw, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, h).permute(2, 0, 1)
        scores = scores + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            scores = scores.view(bw // nw, nw, h, n, n) + mask[None, :, None]
            scores = scores.view(bw, h, n, n)
        attn = self.attn_drop(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class GlobalBlock(nn.Module):
    """HiFuse global feature block: a Swin block whose MLP is replaced by ``Linear -> GELU``.

    y = norm1(x) -> zero-pad to window multiples -> cyclic shift by -shift_size -> window
    attention (shift mask when shift_size > 0) -> reverse shift -> crop -> fc1 -> GELU;
    out = x + drop_path(y). ``norm2`` exists (for checkpoint compatibility) but is not used.

    x: (batch, H*W, dim) tokens of an H x W map -> (batch, H*W, dim).
    """

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} with window {window_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop)
        self.drop_path = _maybe_drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim)  # unused by the official forward pass
        self.fc1 = Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x, H, W, attn_mask=None):
        """x: (batch, H*W, dim); attn_mask: (num_windows, ws*ws, ws*ws) for the padded map or None."""
        b, length, c = x.shape
        if length != H * W:
            raise ValueError(f"GlobalBlock got {length} tokens for a {H}x{W} map")
        ws = self.window_size
        shortcut = x
        y = self.norm1(x).view(b, H, W, c)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = H + pad_b, W + pad_r
        if self.shift_size > 0:
            y = torch.roll(y, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = attn_mask
        else:
            mask = None
        windows = window_partition(y, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, mask=mask)
        y = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)
        if self.shift_size > 0:
            y = torch.roll(y, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        if pad_b > 0 or pad_r > 0:
            y = y[:, :H, :W, :].contiguous()
        y = self.act(self.fc1(y.view(b, H * W, c)))
        return shortcut + self.drop_path(y)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(k=stride=patch_size) -> flatten -> optional LayerNorm.

    x: (batch, in_chans, H, W) -> (tokens (batch, H'*W', embed_dim), H', W') with H' = ceil(H/p);
    inputs not divisible by the patch size are zero-padded at the bottom/right.
    """

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm=True):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x):
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.proj(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x), h, w


class PatchMerging(nn.Module):
    """Swin patch merging, built like the official code: called with the *output* width ``dim``
    of the stage, it merges 2x2 neighbourhoods of a ``dim // 2``-channel map.

    x: (batch, H*W, dim//2) -> (batch, ceil(H/2)*ceil(W/2), dim). Odd H/W are zero-padded.
    Parameters: ``norm`` LayerNorm(2*dim), ``reduction`` Linear(2*dim -> dim, no bias).
    """

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        self.dim = half
        self.reduction = Linear(4 * half, 2 * half, bias=False)
        self.norm = nn.LayerNorm(4 * half)

    def forward(self, x, H, W):
        b, length, c = x.shape
        if length != H * W:
            raise ValueError(f"PatchMerging got {length} tokens for a {H}x{W} map")
        x = x.view(b, H, W, c)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], dim=-1
        )
        x = x.view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage of the global branch: optional PatchMerging at the start (``downsample``), then
    ``depth`` GlobalBlocks alternating shift 0 and ``window_size // 2``.

    forward(x, H, W): x (batch, H*W, C_in) -> (x' (batch, H'*W', dim), H', W') where
    C_in = dim // 2 and H' = ceil(H/2) when downsampling, else C_in = dim and H' = H.
    """

    def __init__(self, dim, depth, num_heads, window_size=7, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, downsample=False):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.window_size = window_size
        self.shift_size = window_size // 2
        if isinstance(drop_path, (list, tuple)):
            rates = list(drop_path)
        else:
            rates = [drop_path] * depth
        self.blocks = nn.ModuleList(
            GlobalBlock(dim, num_heads, window_size=window_size, shift_size=0 if i % 2 == 0 else self.shift_size,
                        qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=rates[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def shift_mask(self, H, W, device, dtype):
        """(num_windows, ws*ws, ws*ws) additive mask: 0 inside a region, -100 across regions."""
        ws, s = self.window_size, self.shift_size
        hp = math.ceil(H / ws) * ws
        wp = math.ceil(W / ws) * ws
        region = torch.zeros((1, hp, wp, 1), device=device, dtype=dtype)
        label = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                region[:, hs, wsl, :] = label
                label += 1
        labels = window_partition(region, ws).view(-1, ws * ws)
        diff = labels.unsqueeze(1) - labels.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def forward(self, x, H, W):
        if self.downsample is not None:
            x = self.downsample(x, H, W)
            H, W = (H + 1) // 2, (W + 1) // 2
        mask = self.shift_mask(H, W, x.device, x.dtype)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        return x, H, W


# --------------------------------------------------------------------------------------------
# local (conv) branch
# --------------------------------------------------------------------------------------------


class LocalBlock(nn.Module):
    """HiFuse local feature block.

    y = depthwise 3x3 conv (with bias) -> channels-last LayerNorm(eps 1e-6) -> Linear(dim, dim)
    -> GELU; out = x + drop_path(y). The convolution and the LayerNorm run as one op
    (:func:`medkernels.ops.depthwise_conv2d_layernorm`), which writes the channels-last rows the Linear reads.

    x: (batch, dim, H, W) -> (batch, dim, H, W).
    """

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, 3, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv = Linear(dim, dim)
        self.act = nn.GELU()
        self.drop_path = _maybe_drop_path(drop_path)

    def forward(self, x):
        conv = self.dwconv
        y = _ops.depthwise_conv2d_layernorm(x, conv.weight, conv.bias, self.norm.weight, self.norm.bias,
                                            self.norm.eps, conv.stride, conv.padding)  # (batch, H, W, dim)
        y = self.act(self.pwconv(y))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# hierarchical feature fusion
# --------------------------------------------------------------------------------------------


class HFFBlock(nn.Module):
    """Hierarchical feature fusion block.

    forward(l, g, f):
        l: (batch, ch_1, H, W)       local-branch feature
        g: (batch, ch_2, H, W)       global-branch feature
        f: (batch, ch_int // 2, 2H, 2W) fused feature of the previous stage, or None (first block)
        returns (batch, ch_out, H, W)  (ch_out must equal ch_int when f is given)

    X_f = GELU(W3(norm1(cat[AvgPool2(Updim(f)), W_l(l), W_g(g)])))   with shortcut AvgPool2(Updim(f)),
       or GELU(W(norm2(cat[W_l(l), W_g(g)])))                         with shortcut 0 when f is None;
    l' = spatial attention(l); g' = channel attention(g) (a single sigmoid gate: this is what the
    official ``main_model.py`` computes and what its reference logits match; a derived copy of the
    code that applies the sigmoid twice does not reproduce them);
    out = shortcut + drop_path(IRMLP(norm3(cat[g', l', X_f]))).

    ``hff_attention_tail`` computes norm3(cat[g', l', X_f]) in one op from l, g and X_f: the attentions
    run as gates that the fusion kernel applies while concatenating and normalising, so neither l', g'
    nor the concatenation is materialised.
    """

    def __init__(self, ch_1, ch_2, r_2, ch_int, ch_out, drop_rate=0.0):
        super().__init__()
        self.se = nn.Sequential(
            nn.Conv2d(ch_2, ch_2 // r_2, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(ch_2 // r_2, ch_2, 1, bias=False),
        )
        self.spatial = Conv(2, 1, 7, bn=True, relu=False, bias=False)
        self.W_l = Conv(ch_1, ch_int, 1, bn=True, relu=False)
        self.W_g = Conv(ch_2, ch_int, 1, bn=True, relu=False)
        self.Updim = Conv(ch_int // 2, ch_int, 1, bn=True, relu=True)
        self.norm1 = ChannelsFirstLayerNorm(3 * ch_int, eps=1e-6)
        self.norm2 = ChannelsFirstLayerNorm(2 * ch_int, eps=1e-6)
        self.norm3 = ChannelsFirstLayerNorm(ch_1 + ch_2 + ch_int, eps=1e-6)
        self.W3 = Conv(3 * ch_int, ch_int, 1, bn=True, relu=False)
        self.W = Conv(2 * ch_int, ch_int, 1, bn=True, relu=False)
        self.gelu = nn.GELU()
        self.residual = IRMLP(ch_1 + ch_2 + ch_int, ch_out)
        self.drop_path = _maybe_drop_path(drop_rate)

    def _check_inputs(self, l, g, f):
        for name, t, channels in (("l", l, self.W_l.in_dim), ("g", g, self.W_g.in_dim)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != channels:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"HFFBlock: {name} must have shape (batch, {channels}, H, W), got {shape}")
        if (g.shape[0], *g.shape[2:]) != (l.shape[0], *l.shape[2:]):
            raise ValueError(f"HFFBlock: l and g must have the same batch and spatial size, got {tuple(l.shape)} and {tuple(g.shape)}")
        if f is not None:
            b, _, h, w = l.shape
            ok = isinstance(f, torch.Tensor) and f.dim() == 4
            # the 2x2 average pooling floors: 2H + 1 rows pool to H as well
            ok = ok and (f.shape[0], f.shape[1], f.shape[2] // 2, f.shape[3] // 2) == (b, self.Updim.in_dim, h, w)
            if not ok:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"HFFBlock: f must have shape (batch, ch_int // 2, 2H, 2W) = "
                                 f"{(b, self.Updim.in_dim, 2 * h, 2 * w)}, got {shape}")

    def forward(self, l, g, f=None):
        self._check_inputs(l, g, f)
        w_local = self.W_l(l)
        w_global = self.W_g(g)
        if f is not None:
            w_f = F.avg_pool2d(self.Updim(f), kernel_size=2, stride=2)
            shortcut = w_f
            x_f = self.gelu(self.W3(self.norm1(torch.cat([w_f, w_local, w_global], dim=1))))
        else:
            shortcut = None
            x_f = self.gelu(self.W(self.norm2(torch.cat([w_local, w_global], dim=1))))

        bn_weight, bn_bias, running_mean, running_var, training, momentum, bn_eps = batch_norm_args(self.spatial.bn)
        normed = _ops.hff_attention_tail(
            l, g, x_f, self.spatial.conv.weight, bn_weight, bn_bias, running_mean, running_var, training,
            self.se[0].weight, self.se[2].weight, self.norm3.weight, self.norm3.bias, momentum=momentum,
            bn_eps=bn_eps, ln_eps=self.norm3.eps,
        )
        fused = self.drop_path(self.residual(normed))
        return fused if shortcut is None else shortcut + fused
