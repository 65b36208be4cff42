"""Exponential moving average of a model's weights (kept outside autograd)."""

from __future__ import annotations

import torch
from torch import nn


def warmup_decay(decay: float, step: int) -> float:
    """Effective decay at optimizer step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``.

    Without the warmup a 0.999 EMA still mostly holds the initial weights after a few hundred steps (its
    half-life is ~700 steps), so short runs would export an untrained model.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Shadow copy ``ema = d * ema + (1 - d) * param`` of every floating-point parameter, with
    ``d = warmup_decay(decay, step)``.

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
        self._cache: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor], list[str]] | None = None

    def _pairs_for(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        """(shadows, live parameters, buffer names) for ``model``, cached: walking the module tree and
        building a state dict every step costs more than the averaging itself for small models."""
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1], self._cache[2], self._cache[3]
        live = model.state_dict(keep_vars=True)
        if live.keys() != self.shadow.keys():
            different = sorted(set(self.shadow) ^ set(live))
            raise ValueError(f"EMA and model disagree on state keys: {different[:5]}")
        averaged = [n for n in self.shadow if n in self._parameter_names and self.shadow[n].is_floating_point()]
        buffers = [n for n in self.shadow if n not in set(averaged)]
        # Parameter objects survive .to()/load_state_dict (only their data changes), so holding them is safe.
        self._cache = (model, [self.shadow[n] for n in averaged], [live[n] for n in averaged], buffers)
        return self._cache[1], self._cache[2], self._cache[3]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Move the shadow one step towards ``model``'s current weights. ``step`` (the optimizer step just
        taken, restored on resume) drives the warmup; by default the number of updates so far is used."""
        shadows, params, buffer_names = self._pairs_for(model)
        decay = warmup_decay(self.decay, self.num_updates + 1 if step is None else step)
        if shadows:
            live = [p.detach() if p.dtype == s.dtype else p.detach().to(s.dtype) for s, p in zip(shadows, params)]
            # One fused kernel over all tensors: shadow += (1 - decay) * (param - shadow).
            torch._foreach_lerp_(shadows, live, 1.0 - decay)
        if buffer_names:
            # Buffers may be replaced as objects (e.g. by .to()), so look them up each time.
            buffers = dict(model.named_buffers())
            for name in buffer_names:
                self.shadow[name].copy_(buffers[name])
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
