"""Exponential moving average of a model's weights (kept outside autograd)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy ``ema = decay * ema + (1 - decay) * param`` of every floating-point parameter.

    Buffers (e.g. normalisation statistics) are copied, not averaged. The shadow lives in float32 on the
    model's device, is never part of autograd, and is keyed exactly like ``model.state_dict()`` so that
    :meth:`state_dict` loads straight into the bare model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got ema_decay={decay}")
        self.decay = decay
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: tensor.detach().clone().float() if tensor.is_floating_point() else tensor.detach().clone()
                for name, tensor in model.state_dict().items()
            }
        self._parameter_names = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow one step towards ``model``'s current weights."""
        live = model.state_dict()
        if live.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(live))
            raise ValueError(f"EMA and model disagree on state keys: {missing[:5]}")
        averaged, copied = [], []
        for name, shadow in self.shadow.items():
            if name in self._parameter_names and shadow.is_floating_point():
                averaged.append((shadow, live[name]))
            else:
                copied.append((shadow, live[name]))
        if averaged:
            shadows = [s for s, _ in averaged]
            params = [p.detach().to(dtype=s.dtype) for s, p in averaged]
            # One fused kernel over all tensors: shadow += (1 - decay) * (param - shadow).
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
        for shadow, value in copied:
            shadow.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the averaged weights as a plain state dict (CPU tensors) for the bare model."""
        return {name: tensor.detach().cpu().clone() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow from :meth:`state_dict` output (keys and shapes must match)."""
        if state.keys() != self.shadow.keys():
            different = sorted(set(state) ^ set(self.shadow))
            raise ValueError(f"EMA state keys differ from the model's: {different[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if tensor.shape != self.shadow[name].shape:
                    raise ValueError(
                        f"EMA tensor {name!r} has shape {tuple(tensor.shape)}, model has {tuple(self.shadow[name].shape)}"
                    )
                self.shadow[name].copy_(tensor)
