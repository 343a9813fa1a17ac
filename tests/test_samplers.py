"""Samplers: class probabilities against their formulas, and the empirical frequencies of an epoch."""

import pytest
import torch

from fedlt.errors import FedLTError
from fedlt.samplers import ClassSampler, class_probabilities, make_sampler, progressive_probabilities, sample_by_class
from fedlt.train import instance_balanced_sampler

COUNTS = torch.tensor([100, 25, 4])


def test_class_probabilities():
    assert class_probabilities(COUNTS, 1.0).tolist() == pytest.approx([100 / 129, 25 / 129, 4 / 129])
    assert class_probabilities(COUNTS, 0.0).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    # sqrt: (10, 5, 2) / 17
    assert class_probabilities(COUNTS, 0.5).tolist() == pytest.approx([10 / 17, 5 / 17, 2 / 17])
    # an absent class is never drawn
    assert class_probabilities(torch.tensor([4, 0]), 0.0).tolist() == [1.0, 0.0]


def test_progressive_probabilities():
    # t/T = 1/4: 0.75·IB + 0.25·CB
    assert progressive_probabilities(COUNTS, 1, 4).tolist() == pytest.approx([0.6647287, 0.2286822, 0.1065891])
    assert progressive_probabilities(COUNTS, 0, 4).tolist() == pytest.approx([100 / 129, 25 / 129, 4 / 129])
    assert progressive_probabilities(COUNTS, 4, 4).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


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
