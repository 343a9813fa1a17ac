"""Losses of multi-expert models.

BalPoE: Sanchez Aimar et al., "Balanced Product of Calibrated Experts for Long-Tailed Recognition", CVPR 2023
(emasa/BalPoE-CalibratedLT). MDCS: Zhao et al., "MDCS: More Diverse Experts with Consistency
Self-distillation for Long-tailed Recognition", ICCV 2023 (fistyee/MDCS).

``expert_logits`` is the (M, B, C) stack of :meth:`fedlt.models.experts.MultiExpertModel.expert_logits`.
Neither is registered in ``LOSSES``: they need the per-expert logits of a multi-expert model, not the
(B, C) output ``model(x)`` a ``loss(logits, targets)`` sees, and MDCS also a weak and a strong view of
each image and an epoch-dependent KL weight. The centralized ``balpoe`` and ``mdcs`` methods use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _adjusted(expert_logits: torch.Tensor, log_pi: torch.Tensor, taus) -> torch.Tensor:
    t = torch.as_tensor(taus, dtype=torch.float32, device=expert_logits.device)
    return expert_logits.float() + t[:, None, None] * log_pi.to(expert_logits.device)[None, None, :]


def balpoe_loss(expert_logits: torch.Tensor, targets: torch.Tensor, log_pi: torch.Tensor,
                taus=(0.0, 1.0, 2.0)) -> torch.Tensor:
    """L = (1/M)·Σ_k CE(z_k + τ_k·log π, y), τ = (0, 1, 2); test: argmax of the mean of the raw z_k.

    Keep mean τ = 1 when M changes (the ensemble then targets the balanced error).
    """
    z = _adjusted(expert_logits, log_pi, taus)
    return torch.stack([F.cross_entropy(zk, targets) for zk in z]).mean()


def confident_kl(teacher: torch.Tensor, student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Consistency self-distillation on confident instances (MDCS CS + CIS), temperature 1.

    KL(softmax(teacher).detach() ‖ softmax(student)) summed over classes and averaged over the samples whose
    teacher argmax equals the label (0 when there are none).
    """
    teacher, student = teacher.float().detach(), student.float()
    mask = teacher.argmax(1) == targets
    if not bool(mask.any()):
        return student.sum() * 0.0
    p_t = F.softmax(teacher[mask], 1)
    kl = (p_t * (F.log_softmax(teacher[mask], 1) - F.log_softmax(student[mask], 1))).sum(1)
    return kl.mean()


def mdcs_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, targets: torch.Tensor,
              log_pi: torch.Tensor, lambdas=(-0.5, 1.0, 2.5), kl_weight: float = 0.6) -> torch.Tensor:
    """MDCS (fistyee/MDCS ``model/loss.py`` ``MDCSLoss``): diversity loss + consistency self-distillation.

    With z_k^v = logits of expert k on view v (1 weak teacher, 2 strong student) shifted by λ_k·log π
    (λ = (−0.5, 1, 2.5)):
    L = Σ_k CE([z_k^1; z_k^2], [y; y]) + w·Σ_k KL_conf(z_k^1 → z_k^2), with w = 0.6·min(epoch/20, 1)
    given by the caller as ``kl_weight``.

    Each expert's CE is ONE cross-entropy over the concatenated 2B batch, as in the official trainer
    (``trainer/trainer.py`` stacks the two views and their targets), i.e. the mean of the two views' CE.
    The official shift is log(n^λ + 1e-9) on the raw counts n; λ·log π differs from it by the per-expert
    constant λ·log N (which neither the softmax nor the teacher's argmax sees) and by the 1e-9, and stays
    finite for a class with no sample (where n^−0.5 is infinite).
    """
    z1 = _adjusted(weak_logits, log_pi, lambdas)
    z2 = _adjusted(strong_logits, log_pi, lambdas)
    both = torch.cat([targets, targets])
    ce = sum(F.cross_entropy(torch.cat([a, b]), both) for a, b in zip(z1, z2))
    kl = sum(confident_kl(a, b, targets) for a, b in zip(z1, z2))
    return ce + kl_weight * kl
