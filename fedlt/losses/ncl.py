"""NCL's objective: nested individual learning (NIL) and nested balanced online distillation (NBOD) over hard
category mining (HCM), plus the MoCo-style contrastive term of its self-supervised feature enhancement.

Li et al., "Nested Collaborative Learning for Long-Tailed Visual Recognition", CVPR 2022; follows
Bazinga699/NCL ``lib/loss/loss.py`` (``NIL_NBOD``, ``NBOD``) and ``lib/core/combiner.py``
(``multi_network_default_CON``, the contrastive logits). With z_m the (B, C) logits of expert m, n the training
class counts and s_m = z_m + log n (balanced softmax):

- HCM: the k hard categories of sample i are the top k of expert 0's raw logits z_0 with the label forced to
  the top (so the label is always one of them); the mask M ∈ {0, 1}^{B×C} marks them.
- NIL = Σ_m CE(s_m, y) + Σ_m CE(s_m ⊙ M, y)  (``CE_RATIO`` = ``HCM_RATIO`` = 1 in the official configs).
- NBOD = λ·NBOD₀(s) + λ_h·NBOD₀(s ⊙ M), NBOD₀(a) = 1/(M−1)·Σ_{i≠j} KL(softmax a_j ‖ softmax a_i) with
  ``reduction='batchmean'`` and log p = log(softmax + 1e-9), no stop-gradient on either side (λ = λ_h = 0.6).

Two official details are kept because the numbers depend on them: the partial view multiplies the logits by
the mask, so a non-hard category takes logit 0 and stays in the softmax (it is not removed), and the shift is
the log of the raw counts (not of the frequencies), which matters exactly there, where the 0s are not shifted.
A class with no training sample has log n = −inf in the official code (a NaN loss); here its count is taken
as 1 (shift 0).

Not registered in ``LOSSES``: it needs every expert's logits (``model.expert_logits``), as BalPoE and MDCS do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.errors import FedLTError
from fedlt.losses.base import kl_div_sum
from fedlt.options import Options
from fedlt.train import at_least_float32


def log_counts(class_counts: torch.Tensor) -> torch.Tensor:
    """log n_c, the balanced-softmax shift of NCL (``bsce_weight.log()``); a class with n_c = 0 counts as 1."""
    return torch.as_tensor(class_counts, dtype=torch.float32).clamp(min=1).log()


def hard_category_mask(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """HCM: 1 at the ``k`` largest logits of each row with the label's logit forced to the top (the label
    plus its k − 1 most confused categories), 0 elsewhere; k ≥ C selects every category."""
    forced = logits.detach().scatter(1, targets[:, None], float("inf"))
    top = forced.sort(dim=1, descending=True)[1][:, :k]
    return torch.zeros_like(logits).scatter(1, top, 1.0)


def nbod(logits: list[torch.Tensor] | torch.Tensor, factor: float) -> torch.Tensor:
    """factor/(M−1)·Σ_{i≠j} KL(p_j ‖ p_i) averaged over the batch (``batchmean``), p = softmax, log(p + 1e-9);
    0 for a single expert. Both sides carry gradients (the official code detaches neither)."""
    m = len(logits)
    if m == 1:
        return logits[0].sum() * 0.0
    p = [F.softmax(at_least_float32(z), dim=1) for z in logits]
    log_p = [torch.log(pi + 1e-9) for pi in p]
    total = sum(kl_div_sum(log_p[i], p[j]) / len(p[j]) for i in range(m) for j in range(m) if i != j)  # batchmean
    return factor * total / (m - 1)


def nil_nbod_loss(expert_logits: torch.Tensor, targets: torch.Tensor, log_n: torch.Tensor, k: int,
                  factor: float = 0.6, factor_hard: float = 0.6, ce_ratio: float = 1.0,
                  hard_ratio: float = 1.0) -> torch.Tensor:
    """NIL + NBOD (``NIL_NBOD.forward``) on the (M, B, C) stack of the experts' logits; see the module
    docstring. ``log_n``: :func:`log_counts` of the training class counts; ``k``: hard categories per sample."""
    mask = hard_category_mask(expert_logits[0], targets, k)
    full = [at_least_float32(z) + log_n.to(z.device)[None, :] for z in expert_logits]
    hard = [s * mask for s in full]
    nil = sum(ce_ratio * F.cross_entropy(s, targets) + hard_ratio * F.cross_entropy(h, targets)
              for s, h in zip(full, hard))
    return nbod(full, factor) + nbod(hard, factor_hard) + nil


def moco_logits(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """[q·k, q·Q₁, …, q·Q_K]/T with q, k L2-normalised (``multi_network_default_CON``); ``queue`` is (K, d) of
    unit keys; the positive is column 0 (its CE target is 0)."""
    q, k = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    positive = (q * k).sum(1, keepdim=True)
    return torch.cat([positive, q @ queue.detach().clone().T], dim=1) / temperature


def moco_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """CE(:func:`moco_logits`, 0): InfoNCE of each query against its key and the queue (T = ``MOCO_T`` = 0.2)."""
    logits = moco_logits(query, key, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class NILNBODOptions(Options):
    """The keys of NIL + NBOD shared by ``centralized.method=ncl`` and the ncl client."""

    hard_categories: int | None = Field(None, gt=0, description="k hard categories per sample (HCM_N; "
                                        "None: round(0.3·C), the official 30 of CIFAR-100)")
    distill_weight: float = Field(0.6, ge=0, description="λ of NBOD on all categories")
    distill_weight_hard: float = Field(0.6, ge=0, description="λ_h of NBOD on the hard categories")
    ce_ratio: float = Field(1.0, ge=0, description="weight of NIL's balanced CE on all categories")
    hard_ratio: float = Field(1.0, ge=0, description="weight of NIL's balanced CE on the hard categories")

    def hard_k(self, num_classes: int) -> int:
        """k: ``hard_categories``, else round(0.3·C) (at least 1)."""
        return self.hard_categories or max(1, round(0.3 * num_classes))

    def check_hard_categories(self, num_classes: int, section: str) -> None:
        """Refuse k > C in one line: the top-k hard categories would be every class, NBOD's hard term the same
        as its term on all categories (the official ``torch.topk`` raises)."""
        if self.hard_categories is not None and self.hard_categories > num_classes:
            raise FedLTError(f"config key '{section}.hard_categories' must be at most the number of classes "
                             f"({num_classes}), got {self.hard_categories}")

    def nil_nbod(self, expert_logits: torch.Tensor, targets: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
        """:func:`nil_nbod_loss` with these keys."""
        return nil_nbod_loss(expert_logits, targets, log_n, self.hard_k(expert_logits.shape[-1]),
                             self.distill_weight, self.distill_weight_hard, self.ce_ratio, self.hard_ratio)
