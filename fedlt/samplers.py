"""Class-aware samplers: one epoch of indices (as many as samples) drawn by a class distribution.

p_c = n_c^q / Σ_j n_j^q with q = 1 instance-balanced (IB), q = 0 class-balanced (CB), q = ½ square-root (SR);
progressively balanced: p_c(t) = (1 − λ_t)·p_c^IB + λ_t·p_c^CB, λ_t = t/(T − 1) at epoch t = 0, …, T − 1
(Kang et al., ICLR 2020; facebookresearch/classifier-balancing ``data/MixedPrioritizedSampler.py``: ``lams =
np.linspace(0, 1, epochs)``, so the last epoch is class-balanced).

CB is class-aware sampling, as classifier-balancing's ``data/ClassAwareSampler.py`` draws it (MiSLAS's
``datasets/sampler.py``, CC-SAM's ``datasets/Samplers.py`` and LFME's ``data/CurricSampler.py`` are the same
code): the classes come in cycles, each class once per cycle in a fresh random order; each visit of a class
gives ``samples_per_class`` consecutive samples of it (``num_samples_cls``: 4 in their configs, CC-SAM 1), and
a class's samples come in cycles too (each once per cycle, reshuffled). So every class gets 1/C of an epoch's
draws up to one visit, and a tail image is reused evenly. Not copied: the official cycles run on across epochs;
here they start afresh each epoch (a sampler is a function of the epoch, which keeps a resumed run exact).
SR and PB draw a class from p for every slot, then a sample of that class uniformly (both with replacement), as
the official ``MixedPrioritizedSampler`` draws each sample from its per-sample weights.

Every sampler is a :data:`fedlt.train.Sampler`: ``(labels, generator, epoch) -> indices``.
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
    """p_c(t) = (1 − λ)·p_c^IB + λ·p_c^CB with λ = t/(T − 1) clipped to [0, 1] (0 for T ≤ 1: the official
    ``linspace(0, 1, 1)`` is [0])."""
    r = min(max(epoch / (total_epochs - 1), 0.0), 1.0) if total_epochs > 1 else 0.0
    return (1 - r) * class_probabilities(counts, 1.0) + r * class_probabilities(counts, 0.0)


def class_aware_order(labels: torch.Tensor, generator: torch.Generator, samples_per_class: int = 4,
                      size: int | None = None) -> torch.Tensor:
    """``size`` (default len(labels)) indices by class-aware sampling (see the module docstring): visits of the
    classes present in cycles of a random order, ``samples_per_class`` consecutive samples of the class each,
    taken from the class's own cycles of a random order."""
    labels = labels.cpu()
    size, k = len(labels) if size is None else size, samples_per_class
    counts = torch.bincount(labels)
    present = torch.nonzero(counts).flatten()
    by_class = torch.split(torch.argsort(labels, stable=True), counts.tolist())
    visits = -(-size // k)
    classes = torch.cat([present[torch.randperm(len(present), generator=generator)]
                         for _ in range(-(-visits // len(present)))])[:visits]
    order = torch.empty(visits, k, dtype=torch.long)
    for c in present.tolist():
        visited = classes == c
        need, members = int(visited.sum()) * k, by_class[c]
        cycles = [members[torch.randperm(len(members), generator=generator)] for _ in range(-(-need // len(members)))]
        if cycles:
            order[visited] = torch.cat(cycles)[:need].view(-1, k)
    return order.flatten()[:size]


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
class ClassAwareSampler:
    """The class-balanced :data:`Sampler`: :func:`class_aware_order` each epoch."""

    samples_per_class: int = 4

    def __call__(self, labels: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        return class_aware_order(labels, generator, self.samples_per_class)


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


def make_sampler(name: str, total_epochs: float = 1.0, samples_per_class: int = 4) -> Sampler:
    """``instance`` | ``class_balanced`` (class-aware, ``samples_per_class`` per visit) | ``sqrt`` |
    ``progressive`` (over ``total_epochs``)."""
    if name == "instance":
        return instance_balanced_sampler
    if name == "class_balanced":
        return ClassAwareSampler(samples_per_class)
    if name == "sqrt":
        return ClassSampler(0.5)
    if name == "progressive":
        return ClassSampler(None, total_epochs)
    raise FedLTError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
