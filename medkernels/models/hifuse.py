"""HiFuse classification network (Huo et al., 2024), compatible with the official checkpoints.

The network runs a convolutional local branch (LocalBlock stages) and a Swin-style global branch
(GlobalBlock stages) side by side over four resolutions (1/4 .. 1/32 of the input) and fuses them
stage by stage with HFF blocks; the classifier is LayerNorm + Linear on the spatial mean of the
last fused feature. State-dict names and shapes equal those of the official ``main_model``
(``HiFuse_Tiny/Small/Base``), including the global-branch ``norm``/``head`` that the official
forward pass never uses.

Unlike the official code, any input whose height and width are multiples of 32 is accepted
(the official model reshapes the Swin outputs to hard-coded 56/28/14/7 maps).
"""
import torch
import torch.nn as nn

from medkernels.nn.depthwise import DepthwiseConv2d
from medkernels.nn.hifuse import (
    BasicLayer,
    ChannelsFirstLayerNorm,
    HFFBlock,
    LocalBlock,
    PatchEmbed,
)
from medkernels.nn.linear import Linear

__all__ = ["HiFuse", "hifuse_tiny", "hifuse_small", "hifuse_base"]


class HiFuse(nn.Module):
    """HiFuse: imgs (batch, in_chans, H, W) with H, W multiples of 32 -> logits (batch, num_classes).

    Defaults are those of the official ``main_model``; ``HiFuse_Tiny/Small/Base`` only change the
    depths (see :func:`hifuse_tiny`, :func:`hifuse_small`, :func:`hifuse_base`).
    """

    def __init__(self, num_classes=1000, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 2, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, patch_norm=True, HFF_dp=0.0, conv_depths=(2, 2, 2, 2),
                 conv_dims=(96, 192, 384, 768), conv_drop_path_rate=0.0, conv_head_init_scale=1.0):
        super().__init__()
        if len(depths) != 4 or len(conv_depths) != 4 or len(conv_dims) != 4 or len(num_heads) != 4:
            raise ValueError("HiFuse has exactly four stages: depths, conv_depths, conv_dims, num_heads need 4 entries")
        for i in range(1, 4):
            if conv_dims[i] != 2 * conv_dims[i - 1]:
                raise ValueError(f"conv_dims must double from stage to stage, got {tuple(conv_dims)}")
        self.num_classes = num_classes
        self.patch_size = patch_size

        # ---- local branch: stem + 3 downsamplers, 4 stages of LocalBlocks
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, conv_dims[0], kernel_size=4, stride=4),
            ChannelsFirstLayerNorm(conv_dims[0], eps=1e-6),
        ))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                ChannelsFirstLayerNorm(conv_dims[i], eps=1e-6),
                nn.Conv2d(conv_dims[i], conv_dims[i + 1], kernel_size=2, stride=2),
            ))
        conv_rates = torch.linspace(0, conv_drop_path_rate, sum(conv_depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(nn.Sequential(
                *[LocalBlock(conv_dims[i], drop_path=conv_rates[start + j]) for j in range(conv_depths[i])]
            ))
            start += conv_depths[i]

        self.conv_norm = nn.LayerNorm(conv_dims[-1], eps=1e-6)
        self.conv_head = Linear(conv_dims[-1], num_classes)
        # (as officially, this scaling is overwritten by the weight init below)
        self.conv_head.weight.data.mul_(conv_head_init_scale)
        self.conv_head.bias.data.mul_(conv_head_init_scale)

        # ---- global branch: patch embedding + 4 Swin stages
        self.num_layers = 4
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** 3
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(4):
            layer = BasicLayer(
                embed_dim * 2 ** i,
                depths[i],
                num_heads[i],
                window_size=window_size,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                downsample=i > 0,
            )
            setattr(self, f"layers{i + 1}", layer)
        # kept for checkpoint compatibility; not used in forward (as in the official code)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

        # ---- hierarchical feature fusion (created after the init, as officially)
        for i in range(4):
            c_local, c_global = conv_dims[i], embed_dim * 2 ** i
            setattr(self, f"fu{i + 1}", HFFBlock(c_local, c_global, 16, c_local, c_local, drop_rate=HFF_dp))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, DepthwiseConv2d)):
            nn.init.trunc_normal_(m.weight, std=0.2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _tokens_to_map(x, H, W):
        # (batch, H*W, C) -> (batch, C, H, W)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)

    def forward(self, imgs):
        """imgs: (batch, in_chans, H, W), H and W multiples of 32 -> (batch, num_classes)."""
        if imgs.dim() != 4 or imgs.shape[-2] % 32 or imgs.shape[-1] % 32:
            raise ValueError(
                "HiFuse needs a (batch, channels, H, W) input with H and W multiples of 32; "
                f"got input of shape {tuple(imgs.shape)}"
            )

        # global branch
        x, H, W = self.patch_embed(imgs)
        x = self.pos_drop(x)
        global_maps = []
        for layer in (self.layers1, self.layers2, self.layers3, self.layers4):
            x, H, W = layer(x, H, W)
            global_maps.append(self._tokens_to_map(x, H, W))

        # local branch
        local_maps = []
        y = imgs
        for down, stage in zip(self.downsample_layers, self.stages):
            y = stage(down(y))
            local_maps.append(y)

        # fusion path
        f = None
        for i, fuse in enumerate((self.fu1, self.fu2, self.fu3, self.fu4)):
            f = fuse(local_maps[i], global_maps[i], f)

        return self.conv_head(self.conv_norm(f.mean(dim=(-2, -1))))


def hifuse_tiny(num_classes=1000, **kwargs):
    """HiFuse-Tiny: depths (2, 2, 2, 2) in both branches."""
    return HiFuse(num_classes=num_classes, depths=(2, 2, 2, 2), conv_depths=(2, 2, 2, 2), **kwargs)


def hifuse_small(num_classes=1000, **kwargs):
    """HiFuse-Small: depths (2, 2, 6, 2) in both branches."""
    return HiFuse(num_classes=num_classes, depths=(2, 2, 6, 2), conv_depths=(2, 2, 6, 2), **kwargs)


def hifuse_base(num_classes=1000, **kwargs):
    """HiFuse-Base: depths (2, 2, 18, 2) in both branches."""
    return HiFuse(num_classes=num_classes, depths=(2, 2, 18, 2), conv_depths=(2, 2, 18, 2), **kwargs)
