"""Logit-adjusted cross-entropy and Balanced Softmax.

Logit adjustment: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021
(google-research/google-research ``logit_adjustment``). Balanced Softmax: Ren et al., "Balanced Meta-Softmax
for Long-Tailed Visual Recognition", NeurIPS 2020 (jiawei-ren/BalancedMetaSoftmax ``loss/BalancedSoftmaxLoss.py``).

The post-hoc adjustment :func:`posthoc_adjust` is a transform of the test logits, not a loss: it is not
registered in ``LOSSES`` (the centralized ``posthoc_la`` method uses it).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.losses.base import Loss
from fedlt.options import Options
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


def posthoc_adjust(logits: torch.Tensor, log_pi: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al.): predict argmax_c (z_c − τ·log π_c) for a model trained with
    plain CE. The sign is opposite to the loss mode; never apply both to one model."""
    return logits - tau * log_pi.to(logits.device)


# ---------------------------------------------------------------------------- registered factories


class LogitAdjustedOptions(Options):
    tau: float = Field(1.0, ge=0, description="adjustment strength τ")


def make_logit_adjusted_loss(class_counts: torch.Tensor, tau: float = 1.0) -> Loss:
    """CE(z + τ·log π, y) with π the prior of ``class_counts`` (absent classes: log 1e-12)."""
    return partial(logit_adjusted_loss, log_pi=log_prior(class_counts), tau=tau)


def make_balanced_softmax_loss(class_counts: torch.Tensor) -> Loss:
    """CE(z + log π, y) with π the prior of ``class_counts``."""
    return partial(balanced_softmax_loss, log_pi=log_prior(class_counts))


LOSSES.register("la", make_logit_adjusted_loss, options=LogitAdjustedOptions)
LOSSES.register("balanced_softmax", make_balanced_softmax_loss)
