"""LDAM: label-distribution-aware margin loss (Cao et al., NeurIPS 2019; kaidic/LDAM-DRW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlt.registry import LOSSES


def ldam_margins(counts, max_margin: float = 0.5) -> torch.Tensor:
    """Δ_c = k·n_c^{−1/4}, with k chosen so that max_c Δ_c = ``max_margin`` (0.5)."""
    m = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1) ** -0.25
    return (m * (max_margin / m.max())).float()


def ldam_loss(cosine: torch.Tensor, targets: torch.Tensor, margins: torch.Tensor, scale: float = 30.0,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """L = CE(z, y) with z_j = s·(cos(w_j, h) − Δ_y·[j = y]), s = 30.

    ``cosine`` are the outputs of a cosine classifier with scale 1 (``NormedLinear``): the margin is in
    cosine units. ``weight`` (DRW: class-balanced weights) gives the PyTorch weighted mean Σ w_y·ℓ / Σ w_y.
    """
    cosine = cosine.float()
    delta = margins.to(cosine.device)[targets]
    z = cosine - F.one_hot(targets, cosine.shape[1]).to(cosine.dtype) * delta[:, None]
    return F.cross_entropy(scale * z, targets, weight=None if weight is None else weight.to(cosine.device))


LOSSES.register("ldam_drw", ldam_loss)
