"""SBCL's formulas (Hou et al., "Subclass-balancing Contrastive Learning for Long-tailed Recognition", ICCV 2023;
follows JackHck/SBCL ``SimCLR/loss.py`` (``SupConLoss``, ``SupConLoss_rank``), ``SimCLR/main.py`` (``cluster``,
the subclass numbers) and ``SimCLR/kmeans_gpu.py`` (``kmeans``, cosine distance)).

Subclasses: class c is split into K_c = max(⌊n_c / max(min_j n_j, L)⌋, 1) clusters (L = ``cluster``, 10) by
k-means on the normalised projections f; subclass ids are offset by Σ_{j<c} K_j.

Class temperatures (the "temperature schedule", recomputed at every clustering): d_c = mean_i ‖f_i − μ_c + ε‖ /
log(n_c + 10) (ε = 1e-6 of ``F.pairwise_distance``), clipped to its 20th–80th percentiles over the classes,
τ_c = T·d_c / mean(d); τ_c = T for a class of one subclass.

Loss on the 2B projections of two views (rows a, columns p ≠ a; s_ap = f_a·f_p)::

    L = mean_a [ −(T/T_b)·mean_{p ∈ S(a)} log softmax_{p ≠ a}(s_ap / T)
                 − γ·mean_{p ∈ P(a)} log( e^{s_ap/τ_a} / Σ_{q ∈ Q(a)} e^{s_aq/τ_a} ) ]

S(a): same subclass; Q(a): a's other view and every sample of another subclass; P(a): a's other view and the
samples of the same class in another subclass; τ_a = τ of a's class; T = 0.1, T_b = 0.07, γ = 0.25. Before the
first clustering the official trainer uses plain SupCon on the classes (T_b = T): :func:`supcon_loss`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.options import Options


def subclass_numbers(class_counts, cluster: int = 10) -> list[int]:
    """K_c = max(⌊n_c / max(min_j n_j, L)⌋, 1)."""
    counts = [int(n) for n in class_counts]
    low = max(min(counts), cluster)
    return [max(n // low, 1) for n in counts]


def cosine_kmeans(x: torch.Tensor, k: int, rng: np.random.Generator, tol: float = 1e-3,
                  iter_limit: int = 35) -> torch.Tensor:
    """``kmeans_gpu.kmeans(distance='cosine')``: centres start at k distinct random points; assign each point to
    the centre of least 1 − cos, move each centre to the mean of its points (an empty one to a random point),
    stop when (Σ_k ‖Δc_k‖)² < ``tol`` or after ``iter_limit`` rounds; returns the last assignment (made before
    the last move)."""
    x = x.float()
    centres = x[torch.as_tensor(rng.choice(len(x), k, replace=False))].clone()
    iteration = 0
    while True:
        cos = F.normalize(x, dim=1) @ F.normalize(centres, dim=1).T
        choice = torch.argmin(1 - cos, dim=1)
        previous = centres.clone()
        for j in range(k):
            members = x[choice == j]
            centres[j] = members.mean(0) if len(members) else x[int(rng.integers(len(x)))]
        shift = torch.sqrt(((centres - previous) ** 2).sum(1)).sum()
        iteration += 1
        if shift ** 2 < tol or (iter_limit and iteration >= iter_limit):
            return choice


def class_temperatures(features: torch.Tensor, labels: torch.Tensor, numbers: list[int],
                       temperature: float) -> torch.Tensor:
    """τ_c of the module docstring from the projections ``features`` (N, d) of every training sample."""
    density = np.zeros(len(numbers))
    for c in range(len(numbers)):
        f = features[labels == c]
        centre = f.mean(0)
        density[c] = float(F.pairwise_distance(f, centre[None], p=2).mean() / np.log(len(f) + 10))
    density = density.clip(np.percentile(density, 20), np.percentile(density, 80))
    tau = temperature * (density / density.mean())
    tau[np.asarray(numbers) == 1] = temperature
    return torch.as_tensor(tau, dtype=torch.float32)


def _log_softmax_masked(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    logits = logits - logits.max(1, keepdim=True).values.detach()
    return logits - torch.log((torch.exp(logits) * keep).sum(1, keepdim=True))


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                base_temperature: float = 0.1) -> torch.Tensor:
    """SupCon (Khosla et al., 2020; ``SupConLoss``, contrast_mode 'all') on [view₁; view₂] (2B, d) features."""
    n = features.shape[0]
    lab = labels.repeat(2)
    not_self = 1 - torch.eye(n, device=features.device)
    pos = (lab[:, None] == lab[None]).float() * not_self
    log_prob = _log_softmax_masked(features @ features.T / temperature, not_self)
    return (-(temperature / base_temperature) * (pos * log_prob).sum(1) / pos.sum(1)).mean()


def sbcl_loss(features: torch.Tensor, labels: torch.Tensor, subclasses: torch.Tensor, class_tau: torch.Tensor,
              temperature: float = 0.1, base_temperature: float = 0.07, gamma: float = 0.25) -> torch.Tensor:
    """The bi-granularity loss L of the module docstring on [view₁; view₂] (2B, d) normalised features."""
    n, b = features.shape[0], features.shape[0] // 2
    lab, sub = labels.repeat(2), subclasses.repeat(2)
    eye = torch.eye(n, device=features.device)
    not_self = 1 - eye
    same_sub = (sub[:, None] == sub[None]).float()
    same_class = (lab[:, None] == lab[None]).float()
    sim = features @ features.T
    log_prob = _log_softmax_masked(sim / temperature, not_self)
    pos = same_sub * not_self
    subclass_term = (pos * log_prob).sum(1) / pos.sum(1)
    other_view = torch.roll(eye, b, dims=1)  # (a, a ± B)
    other_sub = 1 - same_sub
    tau = class_tau.to(features.device)[lab]
    log_prob_rank = _log_softmax_masked(sim / tau[:, None], other_view + other_sub)
    label_pos = other_sub * same_class + other_view
    class_term = (label_pos * log_prob_rank).sum(1) / label_pos.sum(1)
    return (-(temperature / base_temperature) * subclass_term - gamma * class_term).mean()


# --- the MoCo-queue form (JackHck/SBCL moco/moco.py, moco/loss.py: ImageNet-LT) ---
# logits (B, 1 + K): [q·k⁺, q·queue]; the queue holds past keys with their class and subclass (−1: empty slot).


def sbcl_queue_loss(logits: torch.Tensor, labels: torch.Tensor, queue_labels: torch.Tensor,
                    subclasses: torch.Tensor, queue_subclasses: torch.Tensor, temperature: float = 0.07,
                    ranking_temperature: float = 0.12, gamma: float = 0.2) -> torch.Tensor:
    """``moco/loss.py`` ``SupConLoss_rank``: mean_a −mean_{p ∈ {k⁺} ∪ S(a)} log softmax(l/T)_p
    − γ·mean_a mean_{p ∈ {k⁺} ∪ P(a)} log(e^{l_p/τ_r} / Σ_{q ∈ {k⁺} ∪ Q(a)} e^{l_q/τ_r}); S: queue entries of
    the same subclass, Q: of another subclass, P: of the same class in another subclass; τ_r a constant."""
    ones = torch.ones(len(labels), 1, device=logits.device)
    same_sub = (subclasses[:, None] == queue_subclasses[None]).float()
    same_class = (labels[:, None] == queue_labels[None]).float()
    log_prob = F.log_softmax(logits / temperature, dim=1)
    sub_mask = torch.cat([ones, same_sub], 1)
    loss_subclass = -((sub_mask * log_prob).sum(1) / sub_mask.sum(1)).mean()
    other_sub = 1 - same_sub
    class_mask = torch.cat([ones, other_sub * same_class], 1)
    rank = logits / ranking_temperature
    log_rank = rank - torch.log((torch.exp(rank) * torch.cat([ones, other_sub], 1)).sum(1, keepdim=True))
    loss_class = -((class_mask * log_rank).sum(1) / class_mask.sum(1)).mean()
    return loss_subclass + gamma * loss_class


def kcl_loss(logits: torch.Tensor, labels: torch.Tensor, queue_labels: torch.Tensor, k: int,
             generator: torch.Generator, temperature: float = 0.07) -> torch.Tensor:
    """``moco/loss.py`` ``KCL`` (the warm-up): k draws of one uniformly chosen same-class queue entry per anchor
    (repeats merge), L = mean_a −Σ_{p ∈ {k⁺} ∪ drawn} log softmax(l/T)_p / (1 + #drawn)."""
    mask = (labels[:, None] == queue_labels[None]).float()
    drawn = torch.zeros_like(mask)
    has = mask.sum(1) > 0
    for _ in range(k):
        pick = torch.multinomial(mask[has].cpu(), 1, generator=generator).squeeze(1) if has.any() else None
        if pick is not None:
            drawn[has.nonzero().squeeze(1), pick.to(mask.device)] = 1
    ones = torch.ones(len(labels), 1, device=logits.device)
    pos = torch.cat([ones, drawn], 1)
    log_prob = F.log_softmax(logits / temperature, dim=1)
    return -((pos * log_prob).sum(1) / pos.sum(1)).mean()


class SBCLContrastOptions(Options):
    """The keys of SBCL's contrastive stage shared by ``centralized.method=sbcl`` and the sbcl client."""

    temperature: float = Field(0.1, gt=0, description="T of both contrastive terms")
    base_temperature: float = Field(0.07, gt=0, description="T_b: the subclass term is scaled by T/T_b")
    gamma: float = Field(0.25, ge=0, description="γ, weight of the class-level (ranking) term")
    cluster: int = Field(10, gt=0, description="L: class c (on a client: local class c) has "
                         "⌊n_c / max(min n, L)⌋ subclasses")
    feat_dim: int = Field(128, gt=0, description="width of the normalised projection")
    kmeans_iters: int = Field(35, gt=0, description="k-means rounds at most")
