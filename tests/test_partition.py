import numpy as np
import pytest

from fedlt.data.longtail import longtail_counts
from fedlt.data.partition import dirichlet_partition, iid_partition, partition_counts, shard_partition
from fedlt.errors import FedLTError

LABELS = np.repeat(np.arange(10), longtail_counts(600, 10, 100))  # 1,488 samples, long-tailed


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_dirichlet_is_an_exact_cover_with_min_size(alpha):
    parts = dirichlet_partition(LABELS, 10, alpha, np.random.default_rng(0), min_size=10)
    assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_is_reproducible_and_seed_dependent():
    a = dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(3))
    b = dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(3))
    c = dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_small_alpha_gives_more_skew_than_large():
    def skew(alpha):
        counts = partition_counts(LABELS, dirichlet_partition(LABELS, 10, alpha, np.random.default_rng(0)), 10)
        return np.mean((counts > 0).sum(1))  # classes per client
    assert skew(0.05) < skew(100.0)


def test_impossible_dirichlet_partitions_are_errors():
    with pytest.raises(FedLTError, match="alpha"):
        dirichlet_partition(LABELS, 10, 0.0, np.random.default_rng(0))
    with pytest.raises(FedLTError, match="at least 10"):
        dirichlet_partition(LABELS, 200, 0.5, np.random.default_rng(0), min_size=10)


def test_shards_deal_equal_label_sorted_pieces():
    parts = shard_partition(LABELS, 8, 2, np.random.default_rng(0))
    assert_exact_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2  # 16 shards of 93 samples, two each
    # on balanced labels each shard holds one class, so a client holds at most 2 classes
    balanced = np.repeat(np.arange(10), 100)
    parts = shard_partition(balanced, 10, 2, np.random.default_rng(0))
    assert max(len(np.unique(balanced[p])) for p in parts) <= 2
    assert sorted(len(p) for p in parts) == [100] * 10


def test_iid_is_an_equal_random_split():
    parts = iid_partition(LABELS, 7, np.random.default_rng(0))
    assert_exact_cover(parts, len(LABELS))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(FedLTError):
        iid_partition(LABELS[:5], 6, np.random.default_rng(0))


def test_partition_counts_matrix():
    labels = np.array([0, 0, 1, 2, 2, 2])
    counts = partition_counts(labels, [np.array([0, 2]), np.array([1, 3, 4, 5])], 3)
    assert counts.tolist() == [[1, 1, 0], [1, 0, 3]]
