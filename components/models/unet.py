"""Small UNet for images from 8x8 up to 32x32: ``net(x, c_noise, cond=None) -> like x``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import FourierNoiseEmbedding, LabelEmbedding


def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides ``channels``."""
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block; the embedding gives a per-channel scale and shift."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over spatial positions, residual."""

    def __init__(self, channels: int, groups: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"attention channels={channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Class-conditional (optional) UNet with residual blocks and attention at low resolution.

    Args:
        image_size: input height = width; must be divisible by 2**(len(channel_mult) - 1).
        in_channels: image channels C of x [B, C, H, W].
        base_channels: channels at the first level.
        channel_mult: channel multiplier per resolution level (one downsampling between levels).
        num_res_blocks: residual blocks per level on the way down.
        attention_resolutions: resolutions (in pixels) at which self-attention is applied.
        num_heads: attention heads.
        num_classes: None for unconditional; otherwise labels 0..num_classes-1 plus null label num_classes.
        label_dropout: probability of replacing a label by the null label in training mode.
        dropout: dropout inside residual blocks.
        groups: maximum GroupNorm group count.
    """

    def __init__(
        self,
        image_size: int = 8,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4,),
        num_heads: int = 1,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
        dropout: float = 0.0,
        groups: int = 8,
    ) -> None:
        super().__init__()
        if len(channel_mult) < 1:
            raise ValueError("channel_mult must name at least one level, got channel_mult=()")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size < factor or image_size % factor != 0:
            raise ValueError(
                f"image_size={image_size} cannot be halved {len(channel_mult) - 1} times: it must be a "
                f"multiple of {factor} (channel_mult={tuple(channel_mult)})"
            )
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got num_res_blocks={num_res_blocks}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        emb_dim = 4 * base_channels

        self.noise_embedding = FourierNoiseEmbedding(base_channels)
        self.noise_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embedding = (
            LabelEmbedding(num_classes, emb_dim, label_dropout) if num_classes is not None else None
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def attention_or_none(ch: int, resolution: int) -> nn.Module | None:
            return _Attention(ch, groups, num_heads) if resolution in attention_resolutions else None

        # Down path: remember the channels of every skip connection.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, resolution = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(
                    nn.ModuleList([_ResBlock(ch, out_ch, emb_dim, groups, dropout), attention_or_none(out_ch, resolution)])
                )
                ch = out_ch
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                resolution //= 2
                skip_channels.append(ch)

        self.mid_block1 = _ResBlock(ch, ch, emb_dim, groups, dropout)
        self.mid_attention = _Attention(ch, groups, num_heads)
        self.mid_block2 = _ResBlock(ch, ch, emb_dim, groups, dropout)

        # Up path: one more block per level than on the way down, each consuming one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks + 1):
                in_ch = ch + skip_channels.pop()
                self.up.append(
                    nn.ModuleList([_ResBlock(in_ch, out_ch, emb_dim, groups, dropout), attention_or_none(out_ch, resolution)])
                )
                ch = out_ch
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
                resolution *= 2

        self.norm_out = _group_norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero output: the preconditioned denoiser then starts as c_skip * x.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Return a tensor shaped like ``x`` [B, C, H, W], in ``x``'s dtype."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W], got shape={tuple(x.shape)}")
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(
                f"input image size {x.shape[2]}x{x.shape[3]} does not match the model's "
                f"image_size={self.image_size} ({self.image_size}x{self.image_size})"
            )
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape [{x.shape[0]}], got shape={tuple(c_noise.shape)}")
        param_dtype = self.conv_in.weight.dtype
        emb = self.noise_mlp(self.noise_embedding(c_noise).to(param_dtype))
        if self.label_embedding is not None:
            emb = emb + self.label_embedding(cond, x.shape[0], x.device).to(param_dtype)
        emb = F.silu(emb)

        h = self.conv_in(x.to(param_dtype))
        skips = [h]
        for module in self.down:
            if isinstance(module, nn.ModuleList):
                block, attention = module
                h = block(h, emb)
                if attention is not None:
                    h = attention(h, emb)
            else:
                h = module(h)
            skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb), emb), emb)

        for module in self.up:
            if isinstance(module, nn.ModuleList):
                block, attention = module
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if attention is not None:
                    h = attention(h, emb)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)
