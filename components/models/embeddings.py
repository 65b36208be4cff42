"""Noise-level and class-label embeddings shared by the MLP and the UNet."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierNoiseEmbedding(nn.Module):
    """Sin/cos features of the scalar noise conditioning ``c_noise`` at geometric frequencies.

    Frequencies are fixed (not learned) and span ``[min_frequency, max_frequency]`` radians per unit of
    ``c_noise``, so both slow variation over the whole noise range (EDM's ``ln(sigma)/4`` lies in about
    [-2, 2]; flow time in [0, 1]) and fine detail are representable.
    """

    def __init__(self, dim: int, min_frequency: float = 1.0, max_frequency: float = 1000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2 != 0:
            raise ValueError(f"embedding dim must be an even integer >= 2, got dim={dim}")
        if not 0 < min_frequency <= max_frequency:
            raise ValueError(
                f"need 0 < min_frequency <= max_frequency, got min_frequency={min_frequency}, "
                f"max_frequency={max_frequency}"
            )
        half = dim // 2
        # float64 for the geometric spacing: float32 rounding of large frequencies shifts phases visibly.
        frequencies = torch.exp(
            torch.linspace(math.log(min_frequency), math.log(max_frequency), half, dtype=torch.float64)
        ).float()
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.dim = dim

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Map ``c_noise`` [B] to features [B, dim] (in the dtype of ``c_noise``'s float promotion)."""
        if c_noise.ndim != 1:
            raise ValueError(f"c_noise must have shape [B], got shape={tuple(c_noise.shape)}")
        # Phases in float32 at least: bf16 phases of large frequencies would be meaningless.
        phases = c_noise.float()[:, None] * self.frequencies[None, :].float()
        return torch.cat([torch.cos(phases), torch.sin(phases)], dim=1)


class LabelEmbedding(nn.Module):
    """Class-label embedding with an extra "null" row (index ``num_classes``) for classifier-free guidance.

    ``cond=None`` means every sample is unlabelled (null token). In training mode, ``label_dropout`` replaces
    each label by the null token with that probability, which is how a single network learns both the
    conditional and the unconditional denoiser.
    """

    def __init__(self, num_classes: int, dim: int, label_dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes}")
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got label_dropout={label_dropout}")
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, cond: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        """Return label features [B, dim]; ``cond`` is a LongTensor [B] in [0, num_classes] or None."""
        if cond is None:
            cond = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        else:
            if cond.shape != (batch_size,):
                raise ValueError(f"cond must have shape [{batch_size}], got shape={tuple(cond.shape)}")
            if cond.dtype.is_floating_point:
                raise ValueError(f"cond must be an integer tensor of class labels, got dtype={cond.dtype}")
            cond = cond.to(device=device, dtype=torch.long)
        if self.training and self.label_dropout > 0.0:
            drop = torch.rand(batch_size, device=device) < self.label_dropout
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        return self.table(cond)
