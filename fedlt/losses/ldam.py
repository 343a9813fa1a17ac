"""LDAM: label-distribution-aware margin loss (Cao et al., "Learning Imbalanced Datasets with
Label-Distribution-Aware Margin Loss", NeurIPS 2019; follows kaidic/LDAM-DRW ``losses.py`` ``LDAMLoss``).

The deferred re-weighting (DRW) schedule is not part of the loss: the centralized ``ldam_drw`` method builds
the loss unweighted, then with ``beta`` (class-balanced weights) from its DRW epoch on.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.losses.base import Loss
from fedlt.losses.reweighting import class_weights
from fedlt.options import Options
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


class LDAMOptions(Options):
    max_margin: float = Field(0.5, gt=0, description="largest margin Δ (the rarest class)")
    s: float = Field(30.0, gt=0, description="logit scale s")
    beta: float | None = Field(None, ge=0, lt=1, description="class-balanced weights with this β (None: unweighted)")


def make_ldam_loss(class_counts: torch.Tensor, max_margin: float = 0.5, s: float = 30.0,
                   beta: float | None = None) -> Loss:
    """LDAM on ``class_counts`` (absent classes get the largest margin), optionally class-balanced weighted.

    The logits must be cosines (a cosine classifier of scale 1: ``model.classifier=cosine model.scale=1``);
    on other logits the loss still trains but the margin is no longer in cosine units.
    """
    weight = None if beta is None else class_weights(class_counts, beta)
    return partial(ldam_loss, margins=ldam_margins(class_counts, max_margin), scale=s, weight=weight)


LOSSES.register("ldam", make_ldam_loss, options=LDAMOptions)
