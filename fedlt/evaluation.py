"""Evaluate a model on the experiment's balanced test set, with an optional post-hoc logit transform."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from fedlt.metrics import evaluate_logits, reliability_bins
from fedlt.train import TensorData, predict_logits


def evaluate_model(model: nn.Module, test: TensorData, train_counts: np.ndarray, batch_size: int = 1024,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   with_bins: bool = False) -> dict:
    logits = predict_logits(model, test, batch_size)
    if transform is not None:
        logits = transform(logits)
    out = evaluate_logits(logits, test.labels.cpu(), train_counts)
    if with_bins:
        out["reliability"] = reliability_bins(torch.softmax(logits, 1).numpy(), test.labels.cpu().numpy())
    return out


ROW_KEYS = ("loss", "accuracy", "balanced_accuracy", "many", "medium", "few", "ece")
LOCAL_ROW_KEYS = ("local_accuracy", "local_accuracy_weighted")  # where the round had a local evaluation
# where the method gives an uncertainty per test sample (TLC: fedlt.metrics.uncertainty_metrics, experts engaged)
UNCERTAINTY_ROW_KEYS = ("uncertainty_mean", "uncertainty_correct", "uncertainty_wrong", "failure_auc",
                        "uncertainty_ece", "experts_engaged")


def metrics_row(m: dict) -> dict:
    """The per-round / per-epoch metrics that go into ``metrics.jsonl`` (no per-class lists)."""
    return {**{k: m[k] for k in ROW_KEYS}, **{k: m[k] for k in LOCAL_ROW_KEYS + UNCERTAINTY_ROW_KEYS if k in m}}


def uncertainty_text(m: dict) -> str:
    """`` u=0.412 (ok 0.301, wrong 0.655) auc=81.2 u_ece=4.10 experts=2.31`` where ``m`` has TLC's uncertainty
    metrics (else ``""``)."""
    if "uncertainty_mean" not in m:
        return ""
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    text = (f" u={m['uncertainty_mean']:.3g} (ok {f(m['uncertainty_correct'], '.3g')}, wrong "
            f"{f(m['uncertainty_wrong'], '.3g')}) auc={f(None if m['failure_auc'] is None else m['failure_auc'] * 100, '.1f')}"
            f" u_ece={m['uncertainty_ece'] * 100:.2f}")
    return text + (f" experts={m['experts_engaged']:.2f}" if "experts_engaged" in m else "")


def due(step: int, total: int, every: int) -> bool:
    """Whether round/epoch ``step`` (1-based) of ``total`` is an ``every``-th one or the last (when to evaluate,
    when to checkpoint)."""
    return step % every == 0 or step == total


def due_count(total: int, every: int) -> int:
    """How many of steps 1..``total`` are :func:`due`: the ``every``-th ones and the last (closed form: a dry run
    of 10¹⁰ epochs counts them at once)."""
    return total // every + (total % every != 0)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: a span of time as a person reads it."""
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(prefix: str, m: dict | None, seconds: float, train_loss: float | None = None,
                  elapsed: float | None = None, remaining: float | None = None) -> str:
    """One progress line: test metrics, or the training loss alone where the step was not evaluated; the step's
    seconds, and where given the run's elapsed time and its estimated time left (``elapsed 1m40s, eta 6m12s``)."""
    clock = f"{seconds:.1f}s"
    if elapsed is not None:
        clock += f"; elapsed {duration(elapsed)}"
    if remaining is not None:
        clock += f", eta {duration(remaining)}"
    if m is None:
        loss = "n/a" if train_loss is None else f"{train_loss:.3f}"
        return f"{prefix} train_loss={loss} (not evaluated, eval.every) ({clock})"
    groups = " ".join(f"{g}={m[g] * 100:5.1f}" if m[g] is not None else f"{g}=  n/a" for g in ("many", "medium", "few"))
    return (f"{prefix} loss={m['loss']:.3f} acc={m['accuracy'] * 100:5.2f} bal={m['balanced_accuracy'] * 100:5.2f} "
            f"{groups}{uncertainty_text(m)} ({clock})")
