"""SHIKE's losses (Jin et al., "Long-Tailed Visual Recognition via Self-Heterogeneous Integration with Knowledge
Excavation", CVPR 2023), following ``mix_outputs`` of jinyan-06/SHIKE ``cifarTrain.py``.

``expert_logits`` is the (M, B, C) stack of :meth:`fedlt.models.experts.MultiExpertModel.expert_logits` (the
experts' cosine logits, scale 30). Not registered in ``LOSSES``: they need every expert's logits.

Dynamic knowledge transfer (stage 1), for each expert i, summed over the M experts::

    L = Σ_i [ CE(z_i, y) + 10·KL̄(q ‖ p̃_i) + Σ_{j≠i} KL̄(softmax z_j ‖ softmax z_i) ]

- hardest negative h = argmax_c of z̄ (the experts' mean logit) with the target's entry set to −30;
- teacher q = softmax(r) with r_h = z̄_h (the hardest negative: the ensemble's mean, suppressed), r_c =
  max_m z_m,c for the other non-targets (the most confident expert's knowledge) and r_y = 0;
- student p̃_i = softmax(z_i with its target entry set to −30) (expert i's non-target distribution);
- KL̄(a ‖ b) = mean over the B·C entries of a·(log a − log b) (``F.kl_div``'s default ``reduction='mean'``,
  i.e. the batch mean divided by C), temperature 1.

As in the official code, the −30 mask is a constant (the cosine scale), the teacher's target entry is the
logit 0 (``max_tea * (1 - hardest_idx) * (1 - labels)`` zeroes it rather than masking it), and no teacher is
detached: gradients flow into q and into every softmax z_j of the mutual term.

Classifier re-training (stage 2): L = Σ_i CE(z_i + log π, y) (balanced softmax per expert; the official adds
log n_c, which differs from log π_c by a constant the softmax does not see).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlt.losses.base import kl_div_sum
from fedlt.train import at_least_float32

TARGET_MASK = -30.0  # the official constant that masks the target logit (the cosine scale s = 30)


def hardest_negative_teacher(expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The teacher's logits r (B, C): the mean logit at the hardest negative, the experts' max at the other
    non-targets, 0 at the target."""
    z = at_least_float32(expert_logits)
    target = F.one_hot(targets, z.shape[-1]).to(z.dtype)
    non_target = z.mean(0) * (1 - target) + TARGET_MASK * target
    hardest = F.one_hot(non_target.argmax(1), z.shape[-1]).to(z.dtype)
    return non_target * hardest + z.max(0).values * (1 - hardest) * (1 - target)


def mean_kl(log_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``F.kl_div(log_student, teacher)`` with the default reduction: mean over every entry of t·(log t − log s)."""
    return kl_div_sum(log_student, teacher) / log_student.numel()


def shike_loss(expert_logits: torch.Tensor, targets: torch.Tensor, hns_weight: float = 10.0) -> torch.Tensor:
    """Stage 1 of SHIKE: Σ_i CE + ``hns_weight``·hardest-negative suppression + mutual distillation (module doc)."""
    z = at_least_float32(expert_logits)
    target = F.one_hot(targets, z.shape[-1]).to(z.dtype)
    teacher = F.softmax(hardest_negative_teacher(z, targets), 1)
    probs = [F.softmax(zi, 1) for zi in z]
    loss = z.new_zeros(())
    for i, zi in enumerate(z):
        log_pi = F.log_softmax(zi, 1)
        loss = loss + F.cross_entropy(zi, targets)
        loss = loss + hns_weight * mean_kl(F.log_softmax(zi * (1 - target) + TARGET_MASK * target, 1), teacher)
        loss = loss + sum(mean_kl(log_pi, probs[j]) for j in range(len(z)) if j != i)
    return loss


def shike_balanced_loss(expert_logits: torch.Tensor, targets: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Stage 2 of SHIKE: Σ_i CE(z_i + log π, y)."""
    z = expert_logits.float() + log_pi.to(expert_logits.device)
    return sum(F.cross_entropy(zi, targets) for zi in z)
