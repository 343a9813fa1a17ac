"""Logit-adjusted cross-entropy (Menon et al., ICLR 2021) and Balanced Softmax (Ren et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlt.registry import LOSSES


def log_prior(counts: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """log π_c with π_c = n_c / Σ_j n_j (the official LA code adds 1e-12 inside the log)."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    return torch.log(counts / counts.sum() + eps)


def logit_adjusted_loss(logits: torch.Tensor, targets: torch.Tensor, log_pi: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """L = CE(z + τ·log π, y), averaged over the batch; predict argmax z at test time."""
    return F.cross_entropy(logits.float() + tau * log_pi.to(logits.device), targets)


def balanced_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax: CE(z + log π, y) (logit adjustment with τ = 1; log n differs by a constant)."""
    return logit_adjusted_loss(logits, targets, log_pi, 1.0)


LOSSES.register("la", logit_adjusted_loss)
LOSSES.register("balanced_softmax", balanced_softmax_loss)


def posthoc_adjust(logits: torch.Tensor, log_pi: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al.): predict argmax_c (z_c − τ·log π_c) for a model trained with
    plain CE. The sign is opposite to the loss mode; never apply both to one model."""
    return logits - tau * log_pi.to(logits.device)


LOSSES.register("posthoc_la", posthoc_adjust)
