"""Bal-BCE (LiVT, Xu et al., CVPR 2023; XuZhengzhuo/LiVT ``Bal_BCE_loss``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedlt.registry import LOSSES


def smoothed_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    """timm's convention: off-target ε/C, on-target 1 − ε + ε/C (rows sum to 1)."""
    off = smoothing / num_classes
    return F.one_hot(targets, num_classes).float() * (1 - smoothing) + off


def bal_bce_loss(logits: torch.Tensor, targets: torch.Tensor, counts, smoothing: float = 0.1) -> torch.Tensor:
    """L = C · mean_{i,c} BCE_with_logits(z_ic + log(π_c/(1−π_c)), t_ic) — the one-vs-rest BCE summed over
    classes and averaged over the batch, with π_c = n_c/N and label-smoothed targets t (ε = 0.1).

    Predict argmax z (no shift). With a uniform prior the shift is −log(C−1), the initial bias of a
    sigmoid head (:func:`sigmoid_bias_init`).
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    pi = n / n.sum()
    shift = (torch.log(pi) - torch.log1p(-pi)).float().to(logits.device)
    t = smoothed_one_hot(targets, logits.shape[1], smoothing).to(logits.device)
    return logits.shape[1] * F.binary_cross_entropy_with_logits(logits.float() + shift, t)


def sigmoid_bias_init(num_classes: int) -> float:
    """b = −log(C − 1): every sigmoid starts at p = 1/C (Cui et al.; LiVT)."""
    return -math.log(num_classes - 1)


LOSSES.register("bal_bce", bal_bce_loss)
