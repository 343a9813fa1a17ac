"""Evaluation on the balanced test set: top-1, balanced accuracy, per-class, many/medium/few, ECE.

Pure numpy/torch; takes logits and labels, so it applies to any model and any post-hoc adjustment.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlt.errors import FedLTError

MANY_THRESHOLD = 100  # a class with more than 100 training samples is many-shot
FEW_THRESHOLD = 20  # fewer than 20 is few-shot; 20..100 inclusive is medium (Kang et al., `shot_acc`)
GROUPS = ("many", "medium", "few")


def class_groups(train_counts: np.ndarray) -> tuple[np.ndarray, str]:
    """Group id per class (0 many, 1 medium, 2 few) and the rule used.

    Count rule: many > 100, few < 20, medium 20–100 (classifier-balancing's ``shot_acc``, Kang et al., ICLR 2020).
    Where it leaves a group empty, thirds by size g(c) = ⌊3·r(c)/C⌋ instead, r(c) the class's rank by training
    count (0: the largest; ties in class order). Classes in decreasing size (class 0 the head, as the long-tailed
    profiles cut them) have r(c) = c: class-index thirds ⌊3c/C⌋; the rule's name says which. That happens on
    Fashion-MNIST-LT and CIFAR-10-LT at every shipped β (no class under 20) and on CIFAR-100-LT at β = 10; there
    ``shot_acc`` reports 0 for the empty group (MDCS's and BalPoE's test.py: NaN), and MiSLAS averages fixed
    class-index ranges instead (CIFAR-10 3/4/3 classes, CIFAR-100 36/35/29, at every β). Where the count rule
    fills all three groups, the groups' accuracies are ``shot_acc``'s (tests/test_metrics.py).
    """
    counts = np.asarray(train_counts)
    by_count = np.where(counts > MANY_THRESHOLD, 0, np.where(counts < FEW_THRESHOLD, 2, 1))
    if all((by_count == g).any() for g in range(3)):
        return by_count, "count (many >100, medium 20-100, few <20)"
    c = len(counts)
    rank = np.empty(c, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(c)
    if np.all(np.diff(counts) <= 0):
        return (3 * rank) // c, "class-index thirds (count rule leaves a group empty)"
    return (3 * rank) // c, "thirds by training count (count rule leaves a group empty; classes not in size order)"


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class absent from ``labels``."""
    correct = np.bincount(labels, weights=(pred == labels).astype(float), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


RELIABILITY_BINS = 15  # confidence bins of the ECE and of summary.json's ``reliability`` (the report pools them)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = RELIABILITY_BINS) -> float:
    """ECE = Σ_b (|B_b|/n)·|acc(B_b) − conf(B_b)| over equal-width, right-closed bins of max-softmax confidence."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)  # (lo, hi]
    ece = 0.0
    for b in range(num_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray,
                     num_bins: int = RELIABILITY_BINS) -> dict[str, list[float]]:
    """Per-bin count, accuracy and confidence (for reliability diagrams)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    out: dict[str, list[float]] = {"count": [], "accuracy": [], "confidence": []}
    for b in range(num_bins):
        m = bins == b
        out["count"].append(int(m.sum()))
        out["accuracy"].append(float(correct[m].mean()) if m.any() else 0.0)
        out["confidence"].append(float(conf[m].mean()) if m.any() else 0.0)
    return out


class NonFiniteOutputs(FedLTError):
    """The evaluated model's test outputs hold NaN or +inf (e.g. a BatchNorm variance gone negative): the run
    stops, its last checkpoint kept, rather than report the accuracy of an argmax over NaN."""


def evaluate_logits(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                    train_counts: np.ndarray) -> dict:
    """All metrics of a run from test logits (N, C), test labels (N,) and training counts (C,)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    labels_np = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
    num_classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1).numpy()
    broken = int((~np.isfinite(probs)).any(axis=1).sum())  # NaN or +inf logits (−inf alone is a valid mask)
    if broken:
        raise NonFiniteOutputs(f"the model's outputs are NaN or infinite on {broken:,} of {len(probs):,} test images, "
                               f"so its accuracy would mean nothing (argmax of NaN): the model diverged")
    pred = probs.argmax(axis=1)
    per_class = per_class_accuracy(pred, labels_np, num_classes)
    groups, rule = class_groups(train_counts)
    out = {
        "accuracy": float((pred == labels_np).mean()),
        "balanced_accuracy": float(np.nanmean(per_class)),
        "loss": float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels_np)).item()),
        "ece": expected_calibration_error(probs, labels_np),
        "group_rule": rule,
        "per_class": [None if np.isnan(a) else float(a) for a in per_class],
    }
    for g, name in enumerate(GROUPS):
        accs = per_class[groups == g]
        out[name] = float(np.nanmean(accs)) if len(accs) and not np.all(np.isnan(accs)) else None
    return out


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` separating ``positive`` from the rest: P(s⁺ > s⁻) + ½·P(s⁺ = s⁻) (the Mann-Whitney
    statistic, equal to scikit-learn's ``roc_auc_score``); None where one of the two sets is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average ranks of ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uncertainty_metrics(uncertainty: np.ndarray, correct: np.ndarray, num_bins: int = 10) -> dict[str, float | None]:
    """What an uncertainty u per test sample says about the errors (TLC, Li et al. CVPR 2022; the metrics of
    lblaoke/TLC ``model/metric.py`` of its first release): with the confidence c = 1 − u/max(u),

    - ``failure_auc``: ROC AUC of c separating correct from wrong predictions (``AUC``);
    - ``uncertainty_ece``: Σ_b (|B_b|/n)·|acc(B_b) − mean c(B_b)| over ``num_bins`` = 10 equal bins [lo, hi)
      of c (``ece_score``);
    - ``uncertainty_mean``, ``uncertainty_correct``, ``uncertainty_wrong``: the mean u over all, the correct
      and the wrong predictions (None where there are none).
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    c = 1.0 - u / u.max()
    ece = 0.0
    for b in range(num_bins):
        m = (b / num_bins <= c) & (c < (b + 1) / num_bins)
        if m.any():
            ece += m.sum() * abs(correct[m].mean() - c[m].mean())
    return {"uncertainty_mean": float(u.mean()),
            "uncertainty_correct": float(u[correct].mean()) if correct.any() else None,
            "uncertainty_wrong": float(u[~correct].mean()) if (~correct).any() else None,
            "failure_auc": rank_auc(c, correct), "uncertainty_ece": float(ece / len(u))}
