"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

Convention used everywhere in this codebase (the monograph's ch. 8 form):

    D_w(x, t, c) = w * D(x, t, c) + (1 - w) * D(x, t, null)

w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 guided. (Papers that
write (1 + w') D_c - w' D_null use w = 1 + w'.) The combination is linear, so it is the same in
x0-, eps-, v- or score-space at a fixed (x_t, t). Both branches run in ONE batched call of the
wrapped denoiser, which counts as 2 NFE (`nfe_per_call = 2`, read by the samplers).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


class GuidedDenoiser:
    """Wrap a conditional denoiser D(x, t, cond, **kw) with classifier-free guidance weight w.

    Args:
        denoiser: the conditional denoiser (trained with label dropout).
        w: guidance weight in the convention above (>= 0).
        null_label: the label meaning "no class" (the model's num_classes).
    """

    nfe_per_call = 2

    def __init__(self, denoiser: Callable[..., Tensor], w: float, null_label: int) -> None:
        if w < 0:
            raise ValueError(f"guidance weight w must be >= 0, got {w}")
        if null_label < 0:
            raise ValueError(f"null_label must be >= 0, got {null_label}")
        self.denoiser = denoiser
        self.w = float(w)
        self.null_label = int(null_label)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Guided output at (x, t) for labels `cond` [B]; kwargs (e.g. target=) go to the denoiser."""
        if cond is None:
            raise ValueError("classifier-free guidance needs cond (class labels), got None")
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t_both = torch.cat([t, t]) if t.ndim == 1 else t
        cond_both = torch.cat([cond, torch.full_like(cond, self.null_label)])
        both = self.denoiser(torch.cat([x, x]), t_both, cond_both, **kwargs)
        conditional, unconditional = both[:batch], both[batch:]
        return self.w * conditional + (1.0 - self.w) * unconditional


def guided(denoiser: Callable[..., Tensor], w: float, null_label: int) -> GuidedDenoiser:
    """Return `denoiser` with classifier-free guidance weight `w` (see the module docstring)."""
    return GuidedDenoiser(denoiser, w, null_label)


def guided_if_needed(denoiser: Callable[..., Tensor], w: float, cond: Tensor | None,
                     num_classes: int | None) -> Callable[..., Tensor]:
    """The denoiser a model samples with: guided with weight `w` when it is conditional, labels are given and
    w != 1 (2 NFE per call); the plain denoiser otherwise. The one place that decides guidance."""
    if cond is not None and num_classes is not None and w != 1.0:
        return GuidedDenoiser(denoiser, w, null_label=num_classes)
    return denoiser
