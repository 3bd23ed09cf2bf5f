"""MedMamba building blocks: the 2D selective-scan mixer (SS2D) and the SS-Conv-SSM block.

Re-implementation (own code) of the modules of the official MedMamba (YubiaoYue/MedMamba, ``MedMamba.py``),
with identical parameter names, shapes and forward maths, but without any dependency on ``mamba_ssm``:
the scan path goes through :mod:`medkernels.ops` (``cross_scan``, ``selective_scan``, ``cross_merge``) and the
depthwise convolution through :class:`medkernels.nn.DepthwiseConv2d`, which reads in_proj's channels-last output
in place and writes the layout the scan reads.

Layout conventions: every block here works channels-last, ``(batch, H, W, channels)``, like the official code;
only the convolutional branch and the scan core work in ``(batch, channels, H, W)``.
"""
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from medkernels import ops
from .depthwise import DepthwiseConv2d
from .drop_path import DropPath
from .linear import Linear

__all__ = [
    "channel_shuffle",
    "PatchEmbed2D",
    "PatchMerging2D",
    "SS2D",
    "SSConvSSM",
    "VSSLayer",
]


def check_feature_map(x, name, channels, where, channels_last=True):
    """Raise a TypeError or ValueError naming ``name`` unless ``x`` is a 4-dim tensor with ``channels`` channels:
    (batch, H, W, channels) with ``channels_last``, else (batch, channels, H, W)."""
    layout, dim, where_c = ((f"(batch, H, W, {channels})", -1, "its last dim") if channels_last
                            else (f"(batch, {channels}, H, W)", 1, "dim 1"))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: input '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: input '{name}' must have shape {layout} (4 dims), "
                         f"got {x.dim()} dims with shape {tuple(x.shape)}")
    if x.shape[dim] != channels:
        raise ValueError(f"{where}: input '{name}' must have {channels} channels in {where_c} {layout}, "
                         f"got shape {tuple(x.shape)}")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle on a channels-last tensor.

    x: (batch, H, W, C) with C divisible by ``groups`` -> (batch, H, W, C), where output channel
    ``j * groups + g`` is input channel ``g * (C // groups) + j``.
    """
    b, h, w, c = x.shape
    if c % groups != 0:
        raise ValueError(f"channel_shuffle: {c} channels are not divisible by groups={groups}")
    x = x.reshape(b, h, w, groups, c // groups).transpose(3, 4)
    return x.reshape(b, h, w, c)


class PatchEmbed2D(nn.Module):
    """Non-overlapping patch embedding: Conv2d(k=stride=patch_size) then channels-last, then optional norm.

    x: (batch, in_chans, H, W) -> (batch, H // patch_size, W // patch_size, embed_dim).
    Keys: ``proj.weight/bias``, ``norm.weight/bias``.
    """

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer: Optional[Callable] = None, **kwargs):
        super().__init__()
        if isinstance(patch_size, int):
            patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x


class PatchMerging2D(nn.Module):
    """2x2 patch merging: concat of the four 2x2 phases, norm, then Linear(4*dim -> 2*dim, no bias).

    x: (batch, H, W, dim) -> (batch, H // 2, W // 2, 2 * dim).
    The concat order is (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
    Odd H or W: the last row / column is silently dropped, which is exactly what the official code computes
    (it crops the four phases to H // 2, W // 2; it also prints a warning, which we do not).
    H or W below 2 raises a ValueError.
    """

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x):
        check_feature_map(x, "x", self.dim, "PatchMerging2D")
        b, h, w, c = x.shape
        h2, w2 = h // 2, w // 2
        if h2 == 0 or w2 == 0:
            raise ValueError(f"PatchMerging2D: input 'x' needs H, W >= 2, got shape {tuple(x.shape)}")
        x = x[:, : 2 * h2, : 2 * w2, :]
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SS2D(nn.Module):
    """2D selective scan mixer of MedMamba / VMamba (the official ``SS2D`` with ``forward_corev0``).

    x: (batch, H, W, d_model) -> (batch, H, W, d_model).

    in_proj (no bias) -> split into x, z (each d_inner = expand * d_model) -> depthwise conv d_conv x d_conv
    (+ bias) and SiLU on x -> four-direction cross scan -> per-direction projections to (dt, B, C) ->
    float32 selective scan (softplus(dt + dt_projs_bias), A = -exp(A_logs), skip D) -> merge the four
    directions back to row-major order and sum -> LayerNorm(d_inner) -> * SiLU(z) -> out_proj (no bias).

    Parameters (K = 4 directions, N = d_state, R = dt_rank = ceil(d_model / 16) when "auto"):
    ``x_proj_weight`` (K, R + 2N, d_inner), ``dt_projs_weight`` (K, d_inner, R), ``dt_projs_bias`` (K, d_inner),
    ``A_logs`` (K * d_inner, N), ``Ds`` (K * d_inner,), ``in_proj``, ``conv2d``, ``out_norm``, ``out_proj``.
    """

    K = 4

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=3,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        dropout=0.0,
        conv_bias=True,
        bias=False,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        k, d_inner, n, r = self.K, self.d_inner, self.d_state, self.dt_rank

        # Parameters held directly (registered before the submodules, as in the official state_dict).
        bound = 1.0 / math.sqrt(d_inner)  # nn.Linear's default uniform init bound
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d_inner, **factory).uniform_(-bound, bound))

        dt_std = dt_scale * r ** -0.5
        dt_w = torch.empty(k, d_inner, r, **factory)
        if dt_init == "constant":
            nn.init.constant_(dt_w, dt_std)
        elif dt_init == "random":
            nn.init.uniform_(dt_w, -dt_std, dt_std)
        else:
            raise NotImplementedError(f"SS2D: unknown dt_init {dt_init!r}")
        self.dt_projs_weight = nn.Parameter(dt_w)
        # bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (inverse softplus)
        dt = torch.exp(
            torch.rand(k, d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=device)).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(a_log)  # kept in float32
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(k * d_inner, device=device))  # kept in float32
        self.Ds._no_weight_decay = True

        self.in_proj = Linear(d_model, 2 * d_inner, bias=bias, **factory)
        # depthwise conv with the SiLU fused; keys conv2d.weight (d_inner, 1, d_conv, d_conv), conv2d.bias
        self.conv2d = DepthwiseConv2d(
            d_inner, d_conv, padding=(d_conv - 1) // 2, bias=conv_bias, activation="silu", **factory
        )
        self.out_norm = nn.LayerNorm(d_inner, **factory)
        self.out_proj = Linear(d_inner, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """The scan core: per-pixel projections, then the fused four-direction scan.

        x: (batch, d_inner, H, W) (after conv + SiLU) -> y: (batch, d_inner, H * W) in x's dtype, row-major pixel
        order, the sum of the four directions' outputs. The x_proj/dt_proj projections act on each pixel
        alone, so they are computed once in pixel order; ``ops.ss2d_scan`` walks the four directions itself
        (the official code materialises the four scan orders, projects them and merges them back).
        """
        b, d, h, w = x.shape
        k, length = self.K, h * w
        # Both projections as products in pixel order: (K * (R + 2N), d) @ (d, L) per image writes x_dbl as
        # (b, K, R + 2N, L) and (K, d, R) @ (R, L) per image and direction writes dts as (b, K, d, L), the
        # layouts the scan reads. The einsums of the official code run the same sums as one batched product
        # over (b * L) rows followed by a permuting copy, which took 2-8x longer here (benchmarks/NOTES.md).
        c = self.dt_rank + 2 * self.d_state
        x_dbl = torch.matmul(self.x_proj_weight.reshape(k * c, d), x.reshape(b, d, length)).view(b, k, c, length)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # bias goes to the scan (delta_bias)
        # the activations go to the scan in their own dtype (x's, or the autocast dtype), which computes in
        # float32 from them and answers in that dtype; the official code casts them to float32 first, which
        # changes no value but makes the float32 output refuse a LayerNorm with bfloat16 weights
        y = ops.ss2d_scan(
            x,
            dts.to(x.dtype).reshape(b, k, d, h, w),
            -torch.exp(self.A_logs.float()),
            bs.reshape(b, k, self.d_state, h, w),
            cs.reshape(b, k, self.d_state, h, w),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().reshape(-1),
            delta_softplus=True,
        )
        return y.reshape(b, d, length)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """x: (batch, H, W, d_model) -> (batch, H, W, d_model)."""
        check_feature_map(x, "x", self.d_model, "SS2D")
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, h, w, d_inner) each
        # the conv reads the channels-last half of in_proj's output in place and writes the
        # (b, d_inner, h, w) pixel-order layout the scan reads, SiLU fused
        x = self.conv2d(x.permute(0, 3, 1, 2), memory_format=torch.contiguous_format)
        y = self.forward_core(x)  # (b, d_inner, L)
        y = y.transpose(1, 2).reshape(b, h, w, self.d_inner)
        y = self.out_norm(y) * F.silu(z)
        out = self.out_proj(y)
        if self.dropout is not None:
            out = self.dropout(out)
        return out


class SSConvSSM(nn.Module):
    """MedMamba's ``SS_Conv_SSM`` block.

    input: (batch, H, W, hidden_dim) -> (batch, H, W, hidden_dim); hidden_dim must be even.
    The channels are split in two halves: the first goes through ``conv33conv33conv11`` (BN, conv3x3, BN, ReLU,
    conv3x3, BN, ReLU, conv1x1, ReLU; NCHW), the second through ``ln_1`` -> ``self_attention`` (SS2D) ->
    ``drop_path``; the halves are concatenated (conv half first), channel-shuffled with 2 groups and added
    to the input.
    """

    def __init__(
        self,
        hidden_dim: int = 0,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_drop_rate: float = 0.0,
        d_state: int = 16,
        **kwargs,
    ):
        super().__init__()
        if hidden_dim <= 0 or hidden_dim % 2 != 0:
            raise ValueError(f"SSConvSSM: hidden_dim must be a positive even number, got {hidden_dim}")
        self.hidden_dim = hidden_dim
        half = hidden_dim // 2
        self.ln_1 = norm_layer(half)
        self.self_attention = SS2D(d_model=half, dropout=attn_drop_rate, d_state=d_state, **kwargs)
        self.drop_path = DropPath(drop_path)
        self.conv33conv33conv11 = nn.Sequential(
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, kernel_size=1, stride=1),
            nn.ReLU(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: (batch, H, W, hidden_dim) -> (batch, H, W, hidden_dim)."""
        check_feature_map(input, "input", self.hidden_dim, "SSConvSSM")
        left, right = input.chunk(2, dim=-1)
        right = self.drop_path(self.self_attention(self.ln_1(right)))
        left = self.conv33conv33conv11(left.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        out = channel_shuffle(torch.cat((left, right), dim=-1), groups=2)
        return out + input


class VSSLayer(nn.Module):
    """One MedMamba stage: ``depth`` SSConvSSM blocks, then an optional downsample (PatchMerging2D).

    x: (batch, H, W, dim) -> (batch, H, W, dim), or (batch, H // 2, W // 2, 2 * dim) with a downsample.
    ``drop_path`` is a float or a list with one rate per block.
    """

    def __init__(
        self,
        dim,
        depth,
        attn_drop=0.0,
        drop_path=0.0,
        norm_layer=nn.LayerNorm,
        downsample=None,
        use_checkpoint=False,
        d_state=16,
        **kwargs,
    ):
        super().__init__()
        self.dim = dim
        self.use_checkpoint = use_checkpoint
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            [
                SSConvSSM(
                    hidden_dim=dim,
                    drop_path=rates[i],
                    norm_layer=norm_layer,
                    attn_drop_rate=attn_drop,
                    d_state=d_state,
                )
                for i in range(depth)
            ]
        )
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None

    def forward(self, x):
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x
