"""MedMamba (YubiaoYue/MedMamba): the official ``VSSM`` classifier, re-implemented on medkernels ops.

State-dict keys and shapes are identical to the official model, so official checkpoints load with
``strict=True``. Sizes: :func:`medmamba_t` (depths 2-2-4-2), :func:`medmamba_s` (2-2-8-2), both with dims
96-192-384-768, and :func:`medmamba_b` (2-2-12-2, dims 128-256-512-1024).
"""
import math

import torch
import torch.nn as nn

from medkernels.nn.depthwise import DepthwiseConv2d
from medkernels.nn.linear import Linear
from medkernels.nn.ss2d import PatchEmbed2D, PatchMerging2D, VSSLayer, check_feature_map

__all__ = ["MedMamba", "medmamba_t", "medmamba_s", "medmamba_b"]


class MedMamba(nn.Module):
    """MedMamba image classifier (the official ``VSSM``).

    x: (batch, in_chans, H, W) float -> logits (batch, num_classes).
    H and W should be multiples of ``patch_size * 2 ** (len(depths) - 1)`` (32 by default); otherwise the patch
    merging silently drops the last odd row / column, as the official model computes.

    patch_embed (conv patch_size/patch_size + LayerNorm, channels last) -> stages (``layers``: SSConvSSM
    blocks, PatchMerging2D after every stage but the last) -> global average pool -> ``head`` (Linear).
    There is no final norm. ``drop_path_rate`` is spread linearly over all blocks (0 for the first block).
    """

    def __init__(
        self,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        depths=(2, 2, 4, 2),
        dims=(96, 192, 384, 768),
        d_state=16,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        norm_layer=nn.LayerNorm,
        patch_norm=True,
        use_checkpoint=False,
        **kwargs,
    ):
        super().__init__()
        depths = list(depths)
        self.num_classes = num_classes
        self.num_layers = len(depths)
        if isinstance(dims, int):
            dims = [int(dims * 2 ** i) for i in range(self.num_layers)]
        dims = list(dims)
        self.in_chans = in_chans
        self.embed_dim = dims[0]
        self.num_features = dims[-1]
        self.dims = dims
        if d_state is None:
            d_state = math.ceil(dims[0] / 6)

        self.patch_embed = PatchEmbed2D(
            patch_size=patch_size, in_chans=in_chans, embed_dim=self.embed_dim,
            norm_layer=norm_layer if patch_norm else None,
        )
        self.pos_drop = nn.Dropout(p=drop_rate)

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(
                VSSLayer(
                    dim=dims[i],
                    depth=depth,
                    d_state=d_state,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depth],
                    norm_layer=norm_layer,
                    downsample=PatchMerging2D if i < self.num_layers - 1 else None,
                    use_checkpoint=use_checkpoint,
                )
            )

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # As the official model: trunc-normal Linear weights (std 0.02, zero bias), unit LayerNorm, and
        # Kaiming-normal (fan_out, relu) for every conv weight (conv biases keep their default init).
        # The directly-held SS2D parameters (x_proj_weight, dt_projs_*, A_logs, Ds) keep their own init.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, DepthwiseConv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def forward_backbone(self, x):
        """x: (batch, in_chans, H, W) -> features (batch, H / 32, W / 32, num_features), channels last."""
        check_feature_map(x, "x", self.in_chans, "MedMamba", channels_last=False)
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x):
        """x: (batch, in_chans, H, W) -> logits (batch, num_classes)."""
        x = self.forward_backbone(x)
        x = self.avgpool(x.permute(0, 3, 1, 2))
        return self.head(torch.flatten(x, 1))


def medmamba_t(num_classes=1000, **kw):
    """MedMamba-T: depths [2, 2, 4, 2], dims [96, 192, 384, 768]."""
    return MedMamba(num_classes=num_classes, depths=[2, 2, 4, 2], dims=[96, 192, 384, 768], **kw)


def medmamba_s(num_classes=1000, **kw):
    """MedMamba-S: depths [2, 2, 8, 2], dims [96, 192, 384, 768]."""
    return MedMamba(num_classes=num_classes, depths=[2, 2, 8, 2], dims=[96, 192, 384, 768], **kw)


def medmamba_b(num_classes=1000, **kw):
    """MedMamba-B: depths [2, 2, 12, 2], dims [128, 256, 512, 1024]."""
    return MedMamba(num_classes=num_classes, depths=[2, 2, 12, 2], dims=[128, 256, 512, 1024], **kw)
