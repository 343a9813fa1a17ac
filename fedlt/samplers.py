"""Class-aware samplers: one epoch of indices (as many as samples) drawn by a class distribution.

p_c = n_c^q / Σ_j n_j^q with q = 1 instance-balanced (IB), q = 0 class-balanced (CB), q = ½ square-root (SR);
progressively balanced: p_c(t) = (1 − t/T)·p_c^IB + (t/T)·p_c^CB at epoch t of T (Kang et al., ICLR 2020).
A CB/SR/PB epoch draws a class from p for every slot, then a sample of that class uniformly (both with
replacement). Every sampler is a :data:`fedlt.train.Sampler`: ``(labels, generator, epoch) -> indices``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlt.errors import FedLTError
from fedlt.train import Sampler, instance_balanced_sampler

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive")


def class_probabilities(counts: torch.Tensor, q: float) -> torch.Tensor:
    """p_c = n_c^q / Σ_j n_j^q over the classes present (absent classes get 0)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = torch.where(n > 0, n.clamp_min(1) ** q, torch.zeros_like(n))
    return w / w.sum()


def progressive_probabilities(counts: torch.Tensor, epoch: float, total_epochs: float) -> torch.Tensor:
    """p_c(t) = (1 − t/T)·p_c^IB + (t/T)·p_c^CB, t/T clipped to [0, 1]."""
    r = min(max(epoch / max(total_epochs, 1e-12), 0.0), 1.0)
    return (1 - r) * class_probabilities(counts, 1.0) + r * class_probabilities(counts, 0.0)


def sample_by_class(labels: torch.Tensor, probs: torch.Tensor, generator: torch.Generator,
                    size: int | None = None) -> torch.Tensor:
    """``size`` (default len(labels)) indices: class c ~ p, then a uniform sample of class c."""
    labels = labels.cpu()
    size = len(labels) if size is None else size
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=len(probs))
    starts = torch.cumsum(counts, 0) - counts
    cls = torch.multinomial(probs.float(), size, replacement=True, generator=generator)
    within = (torch.rand(size, generator=generator, dtype=torch.float64) * counts[cls]).long()
    return order[starts[cls] + within]


@dataclass
class ClassSampler:
    """A :data:`Sampler` with p_c = n_c^q / Σ n^q, or progressive over ``total_epochs`` when ``q`` is None."""

    q: float | None
    total_epochs: float = 1.0

    def probabilities(self, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        counts = torch.bincount(labels.cpu())
        if self.q is None:
            return progressive_probabilities(counts, epoch, self.total_epochs)
        return class_probabilities(counts, self.q)

    def __call__(self, labels: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        return sample_by_class(labels, self.probabilities(labels, epoch), generator)


def make_sampler(name: str, total_epochs: float = 1.0) -> Sampler:
    """``instance`` | ``class_balanced`` | ``sqrt`` | ``progressive`` (over ``total_epochs``)."""
    if name == "instance":
        return instance_balanced_sampler
    if name == "class_balanced":
        return ClassSampler(0.0)
    if name == "sqrt":
        return ClassSampler(0.5)
    if name == "progressive":
        return ClassSampler(None, total_epochs)
    raise FedLTError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
