"""Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018; facebookresearch/mixup-cifar10)
and MiSLAS's label-aware smoothing (Zhong et al., "Improving Calibration for Long-Tailed Recognition",
CVPR 2021; follows dvlab-research/MiSLAS ``methods.py`` ``LabelAwareSmoothing``).

Mixup mixes the *inputs* of a batch, so it is a batch transform (:func:`mixup_batch`) plus a mixed
criterion (:func:`mixup_cross_entropy`), not a ``loss(logits, targets)``: it is not registered in ``LOSSES``
(the centralized ``mixup``, ``mislas`` and ``balpoe`` methods use it). Label-aware smoothing is a loss and is.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.losses.base import Loss
from fedlt.options import Options
from fedlt.registry import LOSSES


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """x̃ = λ·x + (1 − λ)·x[perm], λ ~ Beta(α, α) once per batch; returns (x̃, y, y[perm], λ).

    α ≤ 0 turns mixup off (λ = 1, identity permutation).
    """
    if alpha <= 0:
        return x, y, y, 1.0
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(y))).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_cutmix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, rng: np.random.Generator,
                       mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                       switch_prob: float = 0.5, smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup/CutMix with soft targets, one draw per batch, as timm's ``Mixup`` (``mode='batch'``,
    ``correct_lam=True``) that LiVT (XuZhengzhuo/LiVT ``main_finetune.py``) feeds to its Bal-BCE.

    With probability ``prob`` the batch is mixed with its reverse (``x.flip(0)``): CutMix with probability
    ``switch_prob`` when both α > 0 (λ ~ Beta(cutmix_α, cutmix_α); a box of side √(1 − λ)·(H, W) centred at a
    uniform pixel and clipped at the border is pasted; λ ← 1 − box area/(H·W)), else mixup
    (λ ~ Beta(mixup_α, mixup_α); x̃ = λx + (1 − λ)·x.flip(0)). Targets t = λ·s(y) + (1 − λ)·s(y.flip(0)) with
    s the label-smoothed one-hot (off ε/C, on 1 − ε + ε/C). Returns (x̃, t, λ).
    """
    lam, use_cutmix = 1.0, False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < switch_prob)
            lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
        elif mixup_alpha > 0:
            lam = float(rng.beta(mixup_alpha, mixup_alpha))
        else:
            use_cutmix, lam = True, float(rng.beta(cutmix_alpha, cutmix_alpha))
    if lam != 1.0:
        if use_cutmix:
            h, w = x.shape[-2:]
            ratio = math.sqrt(1 - lam)
            cut_h, cut_w = int(h * ratio), int(w * ratio)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            yl, yh = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
            xl, xh = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
            x = x.clone()
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        else:
            x = lam * x + (1 - lam) * x.flip(0)
    off = smoothing / num_classes
    y1 = F.one_hot(y, num_classes).float() * (1 - smoothing) + off
    y2 = F.one_hot(y.flip(0), num_classes).float() * (1 - smoothing) + off
    return x, (lam * y1 + (1 - lam) * y2).to(x.device), lam


def mixup_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    """L = λ·CE(z, y_a) + (1 − λ)·CE(z, y_b), batch mean."""
    logits = logits.float()
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


def label_aware_epsilons(counts, eps_head: float = 0.4, eps_tail: float = 0.1) -> torch.Tensor:
    """MiSLAS "concave" label-aware smoothing:
    ε_c = ε_tail + (ε_head − ε_tail)·sin(π(n_c − n_min) / (2(n_max − n_min)))."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    span = max(float(n.max() - n.min()), 1e-12)
    return (eps_tail + (eps_head - eps_tail) * torch.sin(math.pi * (n - n.min()) / (2 * span))).float()


def label_aware_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor,
                               epsilons: torch.Tensor) -> torch.Tensor:
    """MiSLAS ``LabelAwareSmoothing``:
    L = mean_i [(1 − ε_{y_i})·(−log p_{i,y_i}) + ε_{y_i}·mean_c(−log p_{i,c})]."""
    logp = F.log_softmax(logits.float(), dim=1)
    eps = epsilons.to(logits.device)[targets]
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return ((1 - eps) * nll + eps * (-logp.mean(1))).mean()


class LabelAwareSmoothingOptions(Options):
    eps_head: float = Field(0.4, ge=0, lt=1, description="label smoothing of the largest class")
    eps_tail: float = Field(0.1, ge=0, lt=1, description="label smoothing of the smallest class")


def make_label_aware_smoothing_loss(class_counts: torch.Tensor, eps_head: float = 0.4,
                                    eps_tail: float = 0.1) -> Loss:
    """Label-aware smoothing with the ε_c of ``class_counts`` (MiSLAS trains its stage-2 classifier with it)."""
    return partial(label_aware_smoothing_loss, epsilons=label_aware_epsilons(class_counts, eps_head, eps_tail))


LOSSES.register("label_aware_smoothing", make_label_aware_smoothing_loss, options=LabelAwareSmoothingOptions)
