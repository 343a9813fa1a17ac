"""GLMC's formulas (Du et al., "Global and Local Mixture Consistency Cumulative Learning for Long-tailed Visual
Recognitions", CVPR 2023; follows ynu-yangpeng/GLMC ``GLMC-2023/Trainer.py`` and ``utils/util.py``).

A batch (two crop/flip views o₁, o₂ of B images) is mixed with a second, re-sampled batch (two views i₁, i₂),
one λ ~ Beta(1, 1) per step for both mixes (``util.GLMC_mixed``):

- global mixup  x̃ = λ·o₁ + (1 − λ)·i₁,
- local CutMix  x̂ = o₂ with the box of :func:`rand_bbox` pasted from i₂,
- targets       t = λ·e_y + (1 − λ)·e_y' and re-weighted t^w = λ·w_y·e_y + (1 − λ)·w_y'·e_y' for both mixes,
  with w_c = n_c^{−k} / Σ_j n_j^{−k} · C (``update_weight``, k = ``label_weighting``; t^w is not renormalised).

The model has two linear heads on the features h (``fc`` trained on t, ``fc_cb`` on t^w, ``fc_cb`` alone at
test), a projection z = P(h) (d → 128) and a predictor p = Q(z) (128 → 128). The loss of a step is::

    L = α·(CE(fc(x̃), t) + CE(fc(x̂), t)) + (1 − α)·(CE(fc_cb(x̃), t^w) + CE(fc_cb(x̂), t^w))
        + w_mc·(−cos(p̃, sg(ẑ)) − cos(p̂, sg(z̃))),    α = 1 − (e/E)²  (e = 0, 1, … the epoch),

CE(z, t) = −mean_i Σ_c t_ic·log softmax(z_i)_c, sg the stop-gradient (SimSiam's negative cosine).

Official details kept: the CutMix targets use the drawn λ, not the pasted area (the box is clipped at the
border and its side rounded up); the box's first coordinate ranges over dimension 2 (height) and the second over
dimension 3 (width), named W and H in ``rand_bbox``. Official defect not copied: ``Trainer.train`` draws a
λ ~ Beta(``--beta``, ``--beta``) it never uses (``GLMC_mixed`` draws its own from Beta(1, 1)); fedlt draws once.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def glmc_label_weights(class_counts, label_weighting: float) -> torch.Tensor:
    """w_c = n_c^{−k} / Σ_j n_j^{−k} · C (``Trainer.update_weight``); absent classes count as 1."""
    n = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1)
    w = n ** (-label_weighting)
    return (w / w.sum() * len(n)).float()


def cumulative_alpha(epoch: int, epochs: float) -> float:
    """α = 1 − (e/E)², the weight of the plain (head) loss at the 0-based epoch e of E."""
    return 1.0 - (epoch / epochs) ** 2


def rand_bbox(size: torch.Size | tuple, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The CutMix box of ``util.rand_bbox``: side ceil(S·√(1 − λ)) about a uniform centre, clipped to the image;
    returns (a1, b1, a2, b2), rows a1:a2 of dimension 2 and columns b1:b2 of dimension 3."""
    w, h = size[2], size[3]
    cut = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(np.ceil(w * cut)), int(np.ceil(h * cut))
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    return (int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cy - cut_h // 2, 0, h)),
            int(np.clip(cx + cut_w // 2, 0, w)), int(np.clip(cy + cut_h // 2, 0, h)))


def glmc_mixed(org1: torch.Tensor, org2: torch.Tensor, invs1: torch.Tensor, invs2: torch.Tensor,
               y_org: torch.Tensor, y_invs: torch.Tensor, weights: torch.Tensor, lam: float,
               box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̃, x̂, t, t^w): mixup of the first views, CutMix of the second views (``box`` from :func:`rand_bbox`),
    the mixed one-hot targets and their re-weighted version (the same for both mixes)."""
    c = len(weights)
    e_org, e_invs = F.one_hot(y_org, c).float(), F.one_hot(y_invs, c).float()
    w = weights.to(org1.device)
    mixup_x = lam * org1 + (1 - lam) * invs1
    a1, b1, a2, b2 = box
    cut_x = org2.clone()
    cut_x[:, :, a1:a2, b1:b2] = invs2[:, :, a1:a2, b1:b2]
    targets = lam * e_org + (1 - lam) * e_invs
    weighted = lam * w * e_org + (1 - lam) * w * e_invs
    return mixup_x, cut_x, targets, weighted


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−mean_i Σ_c t_ic·log softmax(z_i)_c (targets need not sum to 1)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−mean cos(p, sg(z)) (``Trainer.SimSiamLoss``, 'simplified')."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def glmc_loss(mix_heads: tuple[torch.Tensor, ...], cut_heads: tuple[torch.Tensor, ...], targets: torch.Tensor,
              weighted: torch.Tensor, alpha: float, contrast_weight: float) -> torch.Tensor:
    """L of the module docstring from the heads (fc, fc_cb, z, p) of the mixup batch and of the CutMix batch."""
    out1, cb1, z1, p1 = mix_heads
    out2, cb2, z2, p2 = cut_heads
    balance = soft_cross_entropy(out1, targets) + soft_cross_entropy(out2, targets)
    rebalance = soft_cross_entropy(cb1, weighted) + soft_cross_entropy(cb2, weighted)
    contrastive = simsiam_loss(p1, z2) + simsiam_loss(p2, z1)
    return alpha * balance + (1 - alpha) * rebalance + contrast_weight * contrastive
