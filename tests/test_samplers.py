"""Samplers: class probabilities against their formulas, and the empirical frequencies of an epoch."""

import numpy as np
import pytest
import torch

from fedlt.errors import FedLTError
from fedlt.samplers import (
    ClassAwareSampler,
    ClassSampler,
    class_aware_order,
    class_probabilities,
    make_sampler,
    progressive_probabilities,
    sample_by_class,
)
from fedlt.train import instance_balanced_sampler

COUNTS = torch.tensor([100, 25, 4])


def test_class_probabilities():
    assert class_probabilities(COUNTS, 1.0).tolist() == pytest.approx([100 / 129, 25 / 129, 4 / 129])
    assert class_probabilities(COUNTS, 0.0).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    # sqrt: (10, 5, 2) / 17
    assert class_probabilities(COUNTS, 0.5).tolist() == pytest.approx([10 / 17, 5 / 17, 2 / 17])
    # an absent class is never drawn
    assert class_probabilities(torch.tensor([4, 0]), 0.0).tolist() == [1.0, 0.0]


def official_progressive_lambdas(epochs: int) -> list[float]:
    """classifier-balancing ``data/MixedPrioritizedSampler.py`` with ``lam: null, cycle: 0``: ``lams =
    np.linspace(0, 1, epochs)``; epoch 1 (1-based, ``run_networks.py``) draws with ``lams[0]`` set at
    construction, and ``reset_weights(epoch)`` after epoch e sets ``lams[min(e, epochs − 1)]`` for the next."""
    lams = np.linspace(0, 1, epochs)
    return [float(lams[0])] + [float(lams[min(e, epochs - 1)]) for e in range(1, epochs)]


def test_progressive_probabilities():
    ib, cb = class_probabilities(COUNTS, 1.0), class_probabilities(COUNTS, 0.0)
    for t, lam in enumerate(official_progressive_lambdas(4)):  # 0, 1/3, 2/3, 1: the last epoch balanced
        assert progressive_probabilities(COUNTS, t, 4).tolist() == pytest.approx(((1 - lam) * ib + lam * cb).tolist())
    assert progressive_probabilities(COUNTS, 3, 4).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert progressive_probabilities(COUNTS, 0, 1).tolist() == pytest.approx(ib.tolist())  # linspace(0, 1, 1)


def official_class_aware_order(labels: list[int], n: int, num_samples_cls: int) -> list[int]:
    """classifier-balancing ``data/ClassAwareSampler.py`` with its ``RandomCycleIter``s in ``test_mode`` (no
    shuffle): the class iterator and each class's iterator cycle in order; each visit of a class takes
    ``num_samples_cls`` consecutive items of that class's iterator (``next(zip(*[it] * k))``)."""
    def cycle(items):
        while True:
            yield from items

    num_classes = len(set(labels))
    class_iter = cycle(range(num_classes))
    data_iters = [cycle([i for i, y in enumerate(labels) if y == c]) for c in range(num_classes)]
    out, j, batch = [], 0, ()
    while len(out) < n:
        if j >= num_samples_cls:
            j = 0
        if j == 0:
            batch = next(zip(*[data_iters[next(class_iter)]] * num_samples_cls))
        out.append(batch[j])
        j += 1
    return out


@pytest.mark.parametrize("k", [1, 4])
def test_class_aware_order_is_the_official_sampler(k, monkeypatch):
    """With the shuffles taken out of both, fedlt's order is the official one index for index; with them, each
    cycle of visits holds every class once, each visit k samples of one class, and a class's samples are used
    evenly (counts within one of each other: the class cycles without replacement)."""
    lab = labels()
    g = torch.Generator().manual_seed(0)
    shuffled = class_aware_order(lab, g, k)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randperm", lambda n, generator=None: torch.arange(n))
        plain = class_aware_order(lab, g, k)
    assert plain.tolist() == official_class_aware_order(lab.tolist(), len(lab), k)
    assert len(shuffled) == len(lab)
    visits = lab[shuffled][: len(lab) // k * k].view(-1, k)
    assert (visits == visits[:, :1]).all()
    for start in range(0, len(visits) - 2, 3):
        assert sorted(visits[start:start + 3, 0].tolist()) == [0, 1, 2]
    for c in range(3):
        uses = torch.bincount(shuffled[lab[shuffled] == c], minlength=len(lab))[lab == c]
        assert uses.max() - uses.min() <= 1
    assert isinstance(make_sampler("class_balanced", samples_per_class=k), ClassAwareSampler)


def labels():
    lab = torch.cat([torch.full((int(n),), c) for c, n in enumerate(COUNTS)])
    return lab[torch.randperm(129, generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("name,expected", [("class_balanced", [1 / 3, 1 / 3, 1 / 3]),
                                           ("sqrt", [10 / 17, 5 / 17, 2 / 17])])
def test_epoch_frequencies(name, expected):
    lab = labels()
    sampler = make_sampler(name)
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([sampler(lab, g, e) for e in range(200)])
    assert len(idx) == 200 * 129
    freq = torch.bincount(lab[idx], minlength=3).double() / len(idx)
    assert freq.tolist() == pytest.approx(expected, abs=0.01)
    # within a class the samples are drawn uniformly: every tail sample appears
    assert set(idx[lab[idx] == 2].tolist()) == set(torch.nonzero(lab == 2).flatten().tolist())


def test_progressive_sampler_moves_to_balanced():
    lab = labels()
    sampler = make_sampler("progressive", total_epochs=4)
    assert isinstance(sampler, ClassSampler)
    g = torch.Generator().manual_seed(0)
    first = torch.cat([sampler(lab, g, 0) for _ in range(100)])
    last = torch.cat([sampler(lab, g, 4) for _ in range(100)])
    assert (torch.bincount(lab[first], minlength=3).double() / len(first))[2].item() == pytest.approx(4 / 129, abs=0.01)
    assert (torch.bincount(lab[last], minlength=3).double() / len(last))[2].item() == pytest.approx(1 / 3, abs=0.02)


def test_deterministic_and_instance():
    lab = labels()
    a = sample_by_class(lab, class_probabilities(COUNTS, 0.0), torch.Generator().manual_seed(3))
    b = sample_by_class(lab, class_probabilities(COUNTS, 0.0), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert make_sampler("instance") is instance_balanced_sampler
    with pytest.raises(FedLTError):
        make_sampler("nope")
