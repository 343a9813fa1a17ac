"""LFME's formulas (Xiang, Ding, Han, "Learning From Multiple Experts: Self-paced Knowledge Distillation for
Long-tailed Classification", ECCV 2020), transcribed from the official xiangly55/LFME ``run_network_LFME.py``
(``batch_loss``, ``get_distill_loss_weight``, ``instance_weight_scheduler``), ``data/dataloader_LFME.py``
(``Curric_Dataset.set_scale_classwise_instance_weight_with_shot``) and ``loss/DistillationLoss.py``.

Experts E_g are trained on the samples of one class group G_g (many/medium/few) and predict only those classes;
the student (logits z over all C classes) learns from them with

    z'_i  = v_i(e) · z_i                                               (curriculum instance weight on the logits)
    L     = CE(z', y) + Σ_g λ_g · KL( softmax(E_g(x)/T) ‖ softmax(z'[:, G_g]/T) ) · |G_g| / (B·|G_g|)

(the KL is ``F.kl_div`` averaged over the B·|G_g| elements, times |G_g|: summed over classes, averaged over the
batch; every sample of the batch is distilled by every expert; no T² factor), T = 2.

Self-paced expert selection (``get_distill_loss_weight``), with a = the student's accuracy on G_g, A = the
expert's, θ = ``decay_thresh`` = 0.3: λ_g = 1 while a < θ·A, else max((A − a)/A/(1 − θ), 0).

Curriculum instance selection: p_i = the confidence of sample i's expert in its label; per class c, min–max
scaled to w_i ∈ [θ_c, 1] with θ_c = n̄_few / n̄_{g(c)} (mean training count of the smallest group over that of
c's group; the official hard-codes ImageNet-LT's 12/53/230); scheduled linearly v_i(e) = (1 − w_i)/E·e + w_i,
E = half the student's epochs, e = 1, 2, … (the official count): v = w_i at e = 0, 1 at e = E, and, as in the
official code, not clamped after E (a hard sample's weight keeps growing to 2 − w_i at the last epoch).

Guards the official code lacks (it divides by zero there): a class whose confidences are all equal gets
w = 1; an expert of accuracy 0 gets λ = 0 (the student is no worse than it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def lfme_distillation(student_logits: torch.Tensor, expert_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``F.kl_div(log_softmax(z/T), softmax(e/T))`` (mean over the B·K elements) times K (``DistillationLoss``,
    ``scale = len(shot_list[g])``): Σ_k p_k·(log p_k − log q_k) summed over the K classes, averaged over B."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(expert_logits / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="sum") / log_q.numel() * student_logits.shape[1]


def lfme_loss(logits: torch.Tensor, expert_logits: Sequence[torch.Tensor], groups: Sequence[torch.Tensor],
              y: torch.Tensor, instance_weights: torch.Tensor | None, distill_weights: Sequence[float],
              temperature: float = 2.0) -> torch.Tensor:
    """CE(v·z, y) + Σ_g λ_g·KD(v·z[:, G_g], E_g(x)) (``batch_loss``): ``groups[g]`` are the class indices of
    expert g (its output order), ``instance_weights`` v (B,) scale the student's logits (None: 1)."""
    logits = logits.float()
    if instance_weights is not None:
        logits = logits * instance_weights.to(logits).unsqueeze(-1)
    loss = F.cross_entropy(logits, y)
    for z_g, cls, lam in zip(expert_logits, groups, distill_weights):
        if lam != 0:
            loss = loss + lam * lfme_distillation(logits[:, cls.to(logits.device)], z_g.float().detach(), temperature)
    return loss


def self_paced_weight(student_accuracy: float, expert_accuracy: float, decay_thresh: float = 0.3) -> float:
    """λ = 1 while a < θ·A, else max((A − a)/A/(1 − θ), 0) (``get_distill_loss_weight``); 0 when A = 0."""
    if student_accuracy < expert_accuracy * decay_thresh:
        return 1.0
    if expert_accuracy <= 0:
        return 0.0
    return max((expert_accuracy - student_accuracy) / expert_accuracy / (1 - decay_thresh), 0.0)


def group_thresholds(class_counts: np.ndarray, class_group: np.ndarray) -> np.ndarray:
    """θ_c = n̄_few / n̄_{g(c)} per class: the mean training count of the group with the smallest mean over the
    mean of c's group (the official 1, 12/53, 12/230 on ImageNet-LT)."""
    counts = np.asarray(class_counts, dtype=float)
    means = {g: counts[class_group == g].mean() for g in np.unique(class_group)}
    smallest = min(means.values())
    return np.array([smallest / means[g] for g in class_group])


def curriculum_weights(confidence: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per class c: w_i = (p_i − min_c p)/(max_c p − min_c p)·(1 − θ_c) + θ_c
    (``set_scale_classwise_instance_weight_with_shot``); 1 where a class's confidences are all equal."""
    confidence, labels = np.asarray(confidence, dtype=float), np.asarray(labels)
    w = np.ones_like(confidence)
    for c in np.unique(labels):
        idx = labels == c
        p = confidence[idx]
        span = p.max() - p.min()
        if span > 0:
            w[idx] = (p - p.min()) / span * (1 - thresholds[c]) + thresholds[c]
    return w


def scheduled_instance_weight(initial: torch.Tensor, epoch: int, total_epochs: float) -> torch.Tensor:
    """v(e) = (1 − w)/E·e + w with E = total_epochs/2 (``instance_weight_scheduler``, 'Linear'); ``epoch`` is the
    official 1-based epoch; not clamped."""
    half = total_epochs / 2
    return (1 - initial) / half * epoch + initial
