"""Networks: ``net(x, c_noise, cond=None) -> Tensor shaped like x`` (MLP for vectors, UNet for images)."""

from __future__ import annotations

from torch import nn

from .embeddings import FourierNoiseEmbedding, LabelEmbedding
from .mlp import MLP
from .unet import UNet

MODEL_KINDS = {"mlp": MLP, "unet": UNet}


def build_model(kind: str, **kwargs) -> nn.Module:
    """Build a network by kind ("mlp" or "unet"); kwargs go to the class constructor."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind={kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](**kwargs)


__all__ = ["MLP", "UNet", "FourierNoiseEmbedding", "LabelEmbedding", "MODEL_KINDS", "build_model"]
