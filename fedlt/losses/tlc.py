"""TLC: evidential multi-expert opinions, their combination and the training loss (Li et al., "Trustworthy
Long-Tailed Classification", CVPR 2022; follows lblaoke/TLC ``model/ResnetCifar.py`` ``ResNet_s.forward`` and
``model/loss.py`` ``TLCLoss``).

Expert i's logits z_i (a cosine head of scale 30) are Dirichlet evidence e_i = exp(z_i), α_i = e_i + 1,
S_i = Σ_c α_ic; its subjective-logic opinion is belief b_i = e_i/S_i and uncertainty u_i = C/S_i.

Combination (``ResNet_s.forward``): w_0 = 1, and w_{i+1} = w_i·u_i/(1 − κ_i) with the conflict
κ_i = Σ_{j≠k} b_{i−1,j}·b_{i,k} (κ_0 = 0): w_{i+1} is the Dempster-Shafer uncertainty of experts 0..i, except
that the official code takes the conflict with the previous expert's own belief b_{i−1}, not with the combined
belief of experts 0..i−1 (transcribed as it is: the two agree for two experts). 1 − κ is computed as
Σ_j b_{i−1,j}·b_{ij} + u_{i−1} + u_i − u_{i−1}·u_i (equal to it; the official 1 − κ cancels catastrophically
in float32 when two confident experts disagree, giving inf or a negative w). The output is
Σ_i z_i·a_i with a_i = softmax over the BATCH of w_i/η (η = 0.2): a sample's weights depend on the other
samples of its batch, and the output is ~1/B of an expert's logits (the official test batch is 4096).

Loss (``TLCLoss.forward``), per expert i and sample n, with z̃ = z_i − s·Δ_y·[c = y] (the LDAM margins Δ of
:func:`~fedlt.losses.ldam.ldam_margins`, s = 30) and α̃ = exp(z̃):

    ℓ = −ω_y·log(α̃_y/Σα̃) + (e/T)·KL(Dir(α̂) ‖ Dir(1)) − 0.01·t̄²·KL(softmax(x/t) ‖ softmax(z_i/t))

with α̂ = y + (1 − y)·(α̃ + 1) (the evidence of the label removed), e the epoch counted from 1,
T = (R + 500)/0.05 (R the re-weighting epoch), x the combined output (no gradient), ω the class-balanced
weights (β = 0.9999) and t the diversity temperatures t_c = (C·π_c·0.05 + 0.95)/max (t̄ their mean) after
epoch R (ω = 1, t = 1 before). Dynamic engagement: expert i learns only from the samples with
w_i/max_batch(w_i) > τ (τ = 0.54): L = Σ_i Σ_n m_in·ℓ_in / Σ_n m_in. The cross-entropy term is computed as a
log-softmax (equal to the official log α̃ − log S̃, and finite where exp would overflow), the KL in float64
(ln Γ of an α̂ near e^30, a confident cosine head's evidence, is ~3e14: float32 keeps no digit of the KL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.options import Options


def evidential_opinion(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Belief b = exp(z)/S and uncertainty u = C/S with S = Σ_c exp(z_c) + C, computed in log space."""
    z = logits.float()
    num_classes = z.shape[-1]
    log_s = torch.logaddexp(torch.logsumexp(z, dim=-1), torch.tensor(math.log(num_classes), device=z.device))
    return torch.exp(z - log_s[..., None]), torch.exp(math.log(num_classes) - log_s)


def tlc_combine(expert_logits: torch.Tensor, eta: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The official combined output Σ_i z_i·softmax_batch(w_i/η) and the (M + 1, B) stack of w_0..w_M
    (w_M: the uncertainty of all M experts), for the (M, B, C) expert logits."""
    z = expert_logits.float()
    w = [torch.ones(z.shape[1], device=z.device)]
    previous = None
    for zi in z:
        b, u = evidential_opinion(zi)
        if previous is None:
            w.append(w[-1] * u)
        else:  # 1 − κ = 1 − (1 − u')(1 − u) + Σ_j b'_j·b_j: no cancellation where the experts disagree surely
            b0, u0 = previous
            w.append(w[-1] * u / ((b0 * b).sum(1) + u0 + u - u0 * u))
        previous = b, u
    weights = torch.stack(w)
    a = torch.softmax(weights[:-1] / eta, dim=1)  # over the batch, as the official exp(w/η)/Σ_batch
    return (z * a[:, :, None]).sum(0), weights


def engaged(weights: torch.Tensor, tau: float = 0.54) -> torch.Tensor:
    """The (M, B) dynamic-engagement mask w_i/max_batch(w_i) > τ of experts i = 0..M−1 (``weights``: the
    (M + 1, B) stack of :func:`tlc_combine`; its last row, the final uncertainty, engages nothing)."""
    w = weights[:-1]
    return w / w.max(dim=1, keepdim=True).values > tau


def dirichlet_kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1)) = ln Γ(S) − ln Γ(C) − Σ ln Γ(α_c) + Σ (α_c − 1)(ψ(α_c) − ψ(S)), per row."""
    s = alpha.sum(1)
    c = torch.tensor(float(alpha.shape[1]), device=alpha.device)
    return (torch.lgamma(s) - torch.lgamma(c) - torch.lgamma(alpha).sum(1)
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(1))


def tlc_loss(expert_logits: torch.Tensor, output: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor,
             margins: torch.Tensor, epoch: int, kl_period: float, class_weight: torch.Tensor | None = None,
             temperature: torch.Tensor | None = None, tau: float = 0.54, margin_scale: float = 30.0,
             diversity: float = 0.01) -> torch.Tensor:
    """The TLC loss (module docstring) of the (M, B, C) ``expert_logits`` with the combined ``output`` and the
    (M + 1, B) ``weights`` of :func:`tlc_combine`; ``epoch`` counted from 1, ``kl_period`` = T."""
    z = expert_logits.float()
    y = targets
    one_hot = F.one_hot(y, z.shape[2]).float()
    shift = margin_scale * margins.to(z.device)[y][:, None] * one_hot
    if temperature is None:
        t, t_mean = torch.ones(1, device=z.device), 1.0
    else:
        t = temperature.to(z.device)[None, :]
        t_mean = t.mean().double()  # a tensor, not float(): no host sync, and vmap can batch it
    with torch.no_grad():
        mean_dist = torch.softmax(output.float().detach() / t, dim=1)
    mask = engaged(weights, tau).float()
    loss = z.new_zeros(())
    for i, zi in enumerate(z):
        zm = zi - shift
        ce = F.nll_loss(F.log_softmax(zm, 1), y, weight=None if class_weight is None else class_weight.to(z.device),
                        reduction="none")
        alpha_hat = one_hot + (1 - one_hot) * (torch.exp(zm) + 1)
        kl = dirichlet_kl_to_uniform(alpha_hat.double()).float()  # float32 ln Γ(α ~ e^30) keeps no digit of the KL
        div = (torch.xlogy(mean_dist, mean_dist) - mean_dist * F.log_softmax(zi / t, 1)).sum(1)
        per_sample = ce + epoch / kl_period * kl - diversity * t_mean * t_mean * div
        loss = loss + (mask[i] * per_sample).sum() / mask[i].sum()
    return loss


def tlc_expert_loss(expert_logits: torch.Tensor, targets: torch.Tensor, *, margins: torch.Tensor, epoch: int,
                    kl_period: float, class_weight: torch.Tensor | None = None,
                    temperature: torch.Tensor | None = None, tau: float = 0.54, margin_scale: float = 30.0,
                    diversity: float = 0.01, eta: float = 0.2) -> torch.Tensor:
    """:func:`tlc_loss` of the (M, B, C) ``expert_logits`` combined by :func:`tlc_combine` (η = ``eta``): one
    function of the model's output, so that the fused engine computes a round's clients' losses in one call."""
    output, weights = tlc_combine(expert_logits, eta)
    return tlc_loss(expert_logits, output, weights, targets, margins, epoch, kl_period, class_weight, temperature,
                    tau, margin_scale, diversity)


class TLCLossOptions(Options):
    """The keys of TLC's loss and expert combination shared by ``centralized.method=tlc`` and the tlc client."""

    beta: float = Field(0.9999, ge=0, lt=1, description="β of the class-balanced weights after re-weighting")
    reweight_factor: float = Field(0.05, gt=0, le=1, description="diversity temperature factor (and T's divisor)")
    annealing: float = Field(500.0, ge=0, description="KL annealing: T = (R + annealing)/reweight_factor")
    tau: float = Field(0.54, gt=0, lt=1, description="engagement threshold τ on w_i/max_batch(w_i)")
    eta: float = Field(0.2, gt=0, description="temperature η of the combination weights softmax_batch(w/η)")
    diversity: float = Field(0.01, ge=0, description="weight of the diversity KL")
