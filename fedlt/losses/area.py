"""AREA: class weights from the effective area of each class's feature span (Chen et al., "AREA: Adaptive
Reweighting via Effective Area for Long-Tailed Classification", ICCV 2023; follows xiaohua-chen/AREA
``AREA_cifar.py`` ``get_feature_mean`` and ``calculate_eff_weight``).

For every batch b and every class c present in it with n ≥ 2 samples, the centred features
h̃_i = h_i − μ_c (μ_c: the class mean over the whole training set) give the cosine matrix R_ij = cos(h̃_i, h̃_j)
(a pair with a zero vector counts 0) and the effective number (area) 1 / (aᵀ R a), a = 1/n; a class with one
sample in the batch counts 1. Summed over the batches of one pass, A_c = Σ_b eff_{b,c}; the weights are
w_c ∝ 1/A_c (0 for a class never seen), normalised to Σ_c w_c = C (Eq. 14), and the loss is the weighted CE
``F.cross_entropy(z, y, weight=w)`` (PyTorch weighted mean), recomputed with the current model before each epoch
of the re-weighting stage.

Not copied from the official code: its feature mean is sized for ResNet-32's 64 features (here the model's
feature width), and it computes on ``.cuda()`` tensors (here the data's device).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fedlt.train import at_least_float32


def class_feature_means(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                        class_counts: torch.Tensor) -> torch.Tensor:
    """μ_c = Σ_{i: y_i = c} h_i / n_c over ``batches`` of (features, labels), (C, d); ``class_counts`` are the
    training counts n_c (the official divisor; a class with n_c = 0 gets a non-finite mean, as there)."""
    total = None
    for h, y in batches:
        h = h.detach().float()
        if total is None:
            total = torch.zeros(num_classes, h.shape[1], dtype=h.dtype, device=h.device)
        total.index_add_(0, y, h)
    return total / class_counts.to(total)[:, None]


def batch_effective_areas(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """eff_c of one batch, (C,): 1/(aᵀRa) of the class's centred features (n ≥ 2), 1 for one sample, 0 absent."""
    eff = torch.zeros(means.shape[0], device=features.device)
    centred = features.detach().float() - means[labels]
    for c in torch.unique(labels).tolist():
        f = centred[labels == c]
        if len(f) == 1:
            eff[c] = 1.0
            continue
        norms = f.norm(dim=1, keepdim=True)
        lengths = norms * norms.T
        lengths[lengths == 0] = 1
        r = (f @ f.T) / lengths
        n = len(f)
        eff[c] = 1.0 / (r.sum() / (n * n))
    return eff


def area_weights(areas: torch.Tensor) -> torch.Tensor:
    """w_c = (1/A_c) / Σ_k (1/A_k) · C, with w_c = 0 where A_c = 0 (Eq. 14)."""
    w = torch.where(areas > 0, 1.0 / areas, areas)
    return w / w.sum() * len(w)


def area_class_weights(features_of: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], num_classes: int,
                       class_counts: torch.Tensor) -> torch.Tensor:
    """The AREA weights from two passes of ``features_of()`` (each yields (features, labels) per batch): the
    first for the class means, the second for the effective areas (the official two loader passes)."""
    means = class_feature_means(features_of(), num_classes, class_counts)
    areas = None
    for h, y in features_of():
        eff = batch_effective_areas(h, y, means)
        areas = eff if areas is None else areas + eff
    return area_weights(areas)


def area_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = Σ_i w_{y_i}·CE_i / Σ_i w_{y_i} (``F.cross_entropy(weight=w)``, as the official stage two), in
    float32 at least (a float64 model's loss in float64)."""
    z = at_least_float32(logits)
    return F.cross_entropy(z, targets, weight=weights.to(z))
