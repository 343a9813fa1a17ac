"""Server-side classifier re-training on synthetic features: CCVR's pooled Gaussian statistics (METHODS.md
§3.5) and CReFF's federated features learned by gradient matching (§3.4). Pure torch/numpy; the
strategies in ``strategies/ccvr.py`` and ``strategies/creff.py`` call these."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- CCVR
def pool_class_stats(means: np.ndarray, covs: np.ndarray, counts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global per-class mean and covariance from clients' (K, C, d) means, (K, C, d, d) unbiased covariances
    and (K, C) counts, with N_c = Σ_k n_kc:

    μ_c = Σ_k (n_kc/N_c)·μ_kc
    Σ_c = Σ_k ((n_kc − 1)/(N_c − 1))·Σ_kc + Σ_k (n_kc/(N_c − 1))·μ_kc μ_kcᵀ − (N_c/(N_c − 1))·μ_c μ_cᵀ

    Classes with N_c = 0 get zeros; with N_c = 1 a zero covariance. Returns (μ, Σ, N)."""
    means, covs, counts = (np.asarray(a, dtype=np.float64) for a in (means, covs, counts))
    K, C, d = means.shape
    total = counts.sum(0)
    mu, cov = np.zeros((C, d)), np.zeros((C, d, d))
    for c in range(C):
        n, N = counts[:, c], total[c]
        if N == 0:
            continue
        mu[c] = (n[:, None] * means[:, c]).sum(0) / N
        if N < 2:
            continue
        held = n > 0
        w_cov = (n[held] - 1) / (N - 1)
        outer = np.einsum("ki,kj->kij", means[held, c], means[held, c])
        cov[c] = (np.tensordot(w_cov, covs[held, c], axes=1) + np.tensordot(n[held] / (N - 1), outer, axes=1)
                  - N / (N - 1) * np.outer(mu[c], mu[c]))
    return mu, cov, total


def sample_virtual(mu: np.ndarray, cov: np.ndarray, counts: np.ndarray, per_class: int, ridge: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` draws from N(μ_c, Σ_c + ridge·I) for every class with N_c > 0 (the same number for every
    class, so the re-fit is class-balanced). Returns (features, labels)."""
    feats, labels = [], []
    for c in np.flatnonzero(np.asarray(counts) > 0):
        sigma = torch.as_tensor(cov[c], dtype=torch.float64)
        sigma = 0.5 * (sigma + sigma.T) + ridge * torch.eye(sigma.shape[0], dtype=torch.float64)
        L = torch.linalg.cholesky(sigma)
        z = torch.randn(per_class, sigma.shape[0], generator=generator, dtype=torch.float64)
        feats.append(torch.as_tensor(mu[c], dtype=torch.float64) + z @ L.T)
        labels.append(torch.full((per_class,), int(c), dtype=torch.long))
    return torch.cat(feats).float(), torch.cat(labels)


def fit_classifier(classifier: nn.Module, feats: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                   batch_size: int, generator: torch.Generator, momentum: float = 0.0) -> nn.Module:
    """Train ``classifier`` (a copy is returned) with CE on (features, labels) by mini-batch SGD."""
    clf = copy.deepcopy(classifier).float().train()
    for p in clf.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(clf(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


# --------------------------------------------------------------------------- CReFF
def average_class_grads(grads_w: list[np.ndarray], grads_b: list[np.ndarray], has: list[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the uniform mean of the clients' gradients over the clients that hold the class.
    Inputs per client: (C, C, d), (C, C) and a (C,) 0/1 mask. Returns (g_w, g_b, present mask)."""
    gw, gb, h = np.stack(grads_w), np.stack(grads_b), np.stack(has).astype(np.float64)
    n = h.sum(0)
    safe = np.maximum(n, 1)
    return ((gw * h[:, :, None, None]).sum(0) / safe[:, None, None],
            (gb * h[:, :, None]).sum(0) / safe[:, None], n > 0)


def gradient_distance(gw: torch.Tensor, gb: torch.Tensor, tw: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """D = Σ_rows (1 − cos(gw_row, tw_row)) + (1 − cos(gb, tb)) (the bias as a single row)."""
    return (1 - F.cosine_similarity(gw, tw, dim=1, eps=1e-8)).sum() + (
        1 - F.cosine_similarity(gb[None], tb[None], dim=1, eps=1e-8)).sum()


def match_features(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target_w: torch.Tensor,
                   target_b: torch.Tensor, present: np.ndarray, steps: int, lr: float) -> torch.Tensor:
    """Optimise the federated features F (C, n, d) so that ∇_(W, b) CE(W·F_c + b, c) matches the clients'
    mean gradient of each present class: min_F Σ_c D(∇(F_c), g_c), SGD on F. Returns the new F."""
    feats = features.detach().clone().requires_grad_(True)
    W, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([feats], lr=lr)
    classes = [int(c) for c in np.flatnonzero(present)]
    for _ in range(steps):
        loss = torch.zeros(())
        for c in classes:
            out = feats[c] @ W.T + b
            y = torch.full((feats.shape[1],), c, dtype=torch.long)
            gw, gb = torch.autograd.grad(F.cross_entropy(out, y), [W, b], create_graph=True)
            loss = loss + gradient_distance(gw, gb, target_w[c], target_b[c])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return feats.detach()
