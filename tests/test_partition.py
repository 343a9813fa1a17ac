import functools
import math

import numpy as np
import pytest

from fedlt.data.longtail import longtail_counts
from fedlt.data.partition import (
    creff_dirichlet_partition,
    dirichlet_partition,
    iid_partition,
    multinomial_dirichlet_partition,
    partition_counts,
    shard_partition,
)
from fedlt.errors import FedLTError

LABELS = np.repeat(np.arange(10), longtail_counts(600, 10, 100))  # 1,485 samples, long-tailed


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


# --------------------------------------------------------------------------- the two Dirichlet forms
def niid_bench_balanced(labels, n_parties, beta, rng, min_require_size=10):
    """Transcription of NIID-Bench's ``partition_data(..., 'noniid-labeldir')`` loop (GBME's release copies it),
    with ``np.random`` replaced by the generator ``rng`` (its shuffle-in-place is fedlt's ``permutation``)."""
    N, K = len(labels), int(labels.max()) + 1
    min_size = 0
    while min_size < min_require_size:
        idx_batch = [[] for _ in range(n_parties)]
        for k in range(K):
            idx_k = np.where(labels == k)[0]
            idx_k = rng.permutation(idx_k)
            proportions = rng.dirichlet(np.repeat(beta, n_parties))
            proportions = np.array([p * (len(idx_j) < N / n_parties) for p, idx_j in zip(proportions, idx_batch)])
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions))]
            min_size = min([len(idx_j) for idx_j in idx_batch])
    return [np.sort(np.asarray(b)) for b in idx_batch]


@pytest.mark.parametrize("seed", range(3))
def test_balanced_dirichlet_is_niid_bench(seed):
    ours = dirichlet_partition(LABELS, 10, 0.5, np.random.default_rng(seed), min_size=10, balance=True)
    theirs = niid_bench_balanced(LABELS, 10, 0.5, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_plain_dirichlet_is_the_default_and_reaches_the_tail_more_often():
    """The balance trick closes clients while the head class is dealt: fewer clients hold any tail class."""
    def tail_share(**kw):
        shares = []
        for seed in range(10):
            counts = partition_counts(LABELS, dirichlet_partition(LABELS, 10, 0.5, np.random.default_rng(seed), **kw), 10)
            shares.append(np.mean(counts[:, 7:].sum(1) > 0))
        return np.mean(shares)
    a = dirichlet_partition(LABELS, 10, 0.5, np.random.default_rng(0))
    b = dirichlet_partition(LABELS, 10, 0.5, np.random.default_rng(0), balance=False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert tail_share(balance=False) > tail_share(balance=True) + 0.1


def test_unpartitionable_balanced_dirichlet_is_a_bounded_one_line_error():
    """GBME's old CIFAR-10-LT config (100 clients, α = 0.1, IF 100, balance, ≥ 10 each): NIID-Bench's loop
    would redraw for ever; fedlt stops after max_tries draws."""
    labels = np.repeat(np.arange(10), longtail_counts(5000, 10, 100))
    with pytest.raises(FedLTError, match=r"after 50 draws") as err:
        dirichlet_partition(labels, 100, 0.1, np.random.default_rng(0), min_size=10, balance=True, max_tries=50)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- every shipped config partitions
CLASS_COUNTS = {"fashion_mnist": (10, 6000), "cifar10": (10, 5000), "cifar10_files": (10, 5000), "cifar100": (100, 500)}


def shipped_combos():
    from pathlib import Path

    from fedlt.sweep import expand

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.rglob("*.yaml")):
        for cfg, values in expand(path):
            yield pytest.param(cfg, id=f"{path.relative_to(root)}-{values}")


@pytest.mark.parametrize("cfg", list(shipped_combos()))
def test_every_shipped_config_builds_its_partition(cfg):
    """From label arrays with the source's class counts (no images needed): the long-tailed subset, then the
    partition, an exact cover that meets min_size."""
    from fedlt.experiment import longtail_subset, partition_labels

    assert cfg.data.name in CLASS_COUNTS, f"add the class counts of {cfg.data.name}"
    num_classes, per_class = CLASS_COUNTS[cfg.data.name]
    source = np.repeat(np.arange(num_classes), per_class)
    labels = source[np.sort(longtail_subset(cfg, source, num_classes))]
    parts = partition_labels(cfg, labels)
    assert_exact_cover(parts, len(labels))
    assert len(parts) == cfg.partition.num_clients
    if cfg.partition.method == "dirichlet":
        assert min(len(p) for p in parts) >= cfg.partition.min_size


# --------------------------------------------------------------------------- flwr-datasets Partitioners
class FakeDataset:
    """What the partitioners use of a ``datasets.Dataset``: len, a column, select."""

    def __init__(self, columns: dict):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, column):
        return list(self.columns[column])

    def select(self, indices):
        return FakeDataset({k: [v[i] for i in indices] for k, v in self.columns.items()})


def balanced_dataset(per_class=300, classes=10):
    labels = np.tile(np.arange(classes), per_class)  # interleaved, as a real data set's order
    return FakeDataset({"label": labels.tolist(), "id": list(range(len(labels)))})


def test_dirichlet_label_partitioner_is_fedlts_partition():
    from fedlt.data.flower_partitioners import DirichletLabelPartitioner

    ds = balanced_dataset()
    part = DirichletLabelPartitioner(num_partitions=5, alpha=0.3, seed=1)
    with pytest.raises(AttributeError):
        part.load_partition(0)
    part.dataset = ds
    with pytest.raises(ValueError):
        part.dataset = ds
    assert part.num_partitions == 5 and part.is_dataset_assigned()
    expected = dirichlet_partition(np.asarray(ds["label"]), 5, 0.3, np.random.default_rng(1), 10)
    for k in range(5):
        assert part.load_partition(k)["id"] == expected[k].tolist()
    with pytest.raises(FedLTError):
        part.load_partition(5)


def test_long_tail_partitioner_makes_the_classes_long_tailed():
    from fedlt.data.flower_partitioners import LongTailPartitioner

    ds = FakeDataset({"label": [f"c{c}" for c in np.tile(np.arange(10), 300)]})  # string labels, sorted order
    whole = LongTailPartitioner(num_partitions=1, imbalance_factor=100)
    whole.dataset = ds
    counts = collections_counts(whole.load_partition(0)["label"])
    assert counts == dict(zip([f"c{c}" for c in range(10)], longtail_counts(300, 10, 100).tolist()))
    fed = LongTailPartitioner(num_partitions=4, imbalance_factor=100, alpha=0.5, min_partition_size=5, seed=3)
    fed.dataset = ds
    parts = fed.partition_indices()
    assert sorted(np.concatenate(parts).tolist()) == sorted(LongTailPartitioner(1, 100, seed=3)._partition(
        np.tile(np.arange(10), 300), np.random.default_rng(3))[0].tolist())  # the same long-tailed subset, covered
    assert sum(len(fed.load_partition(k)["label"]) for k in range(4)) == longtail_counts(300, 10, 100).sum()
    iid = LongTailPartitioner(num_partitions=3, imbalance_factor=10, alpha=None)
    iid.dataset = ds
    assert [len(p) for p in iid.partition_indices()] == [len(p) for p in np.array_split(np.arange(
        longtail_counts(300, 10, 10).sum()), 3)]


def collections_counts(values):
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def test_shards_partitioner():
    from fedlt.data.flower_partitioners import ShardsPartitioner

    ds = balanced_dataset(100)
    part = ShardsPartitioner(num_partitions=5, shards_per_partition=2, seed=0)
    part.dataset = ds
    assert all(len(np.unique(part.load_partition(k)["label"])) <= 2 for k in range(5))


def test_creff_partitioner_gives_the_routines_equal_partitions():
    from fedlt.data.flower_partitioners import CReFFDirichletPartitioner

    part = CReFFDirichletPartitioner(num_partitions=10, alpha=0.5, seed=0)
    part.dataset = FakeDataset({"label": LABELS.tolist()})
    ours = part.partition_indices()
    assert all(np.array_equal(a, b) for a, b in zip(ours, creff_dirichlet_partition(
        LABELS, 10, 0.5, np.random.default_rng(0))))
    assert [len(part.load_partition(k)["label"]) for k in range(10)] == [len(p) for p in np.array_split(LABELS, 10)]


# --------------------------------------------------------------------------- CReFF's routine
def creff_official(labels, num_clients, alpha, seed):
    """Transcription of CReFF-FL's ``Dataset/sample_dirichlet.py`` (``clients_indices`` →
    ``build_non_iid_by_dirichlet`` with 10 auxiliary workers → ``partition_balance``), list arithmetic as there."""
    num_classes = int(labels.max()) + 1
    random_state = np.random.RandomState(seed)
    pairs = [(i, int(y)) for i, y in enumerate(labels)]
    random_state.shuffle(pairs)
    aux, n_workers, num = 10, num_clients, len(pairs)
    splits = math.ceil(n_workers / aux)
    chunks, start = [], 0
    for s in range(splits):
        end = start + int(aux / n_workers * num)
        chunks.append(pairs[start:(num if s == splits - 1 else end)])
        start = end
    batches = []
    for chunk in chunks:
        chunk = np.array(chunk)
        size = len(chunk)
        workers = min(aux, n_workers)
        n_workers = n_workers - aux
        min_size, batch = 0, None
        while min_size < int(0.50 * size / workers):
            batch = [[] for _ in range(workers)]
            for c in range(num_classes):
                idx_c = chunk[np.where(chunk[:, 1] == c)[0], 0]
                p = random_state.dirichlet(np.repeat(alpha, workers))
                p = np.array([q * (len(b) < size / workers) for q, b in zip(p, batch)])
                p = p / p.sum()
                p = (np.cumsum(p) * len(idx_c)).astype(int)[:-1]
                batch = [b + part.tolist() for b, part in zip(batch, np.split(idx_c, p))]
                min_size = min(len(b) for b in batch)
        batches += batch
    flat = functools.reduce(lambda x, y: x + y, batches)
    per, r = len(flat) // num_clients, len(flat) % num_clients
    out, i, used = [], 0, 0
    while i < len(flat):
        step = per + 1 if used < r else per
        used += used < r
        out.append(flat[i:i + step])
        i += step
    return out


@pytest.mark.parametrize("num_clients,alpha,seed", [(10, 0.5, 7), (20, 0.3, 0), (25, 0.5, 1)])
def test_creff_partition_draws_the_official_partition(num_clients, alpha, seed):
    """Given the same RandomState, fedlt's routine returns CReFF-FL's clients (25 clients: groups of 10, 10, 5)."""
    ours = creff_dirichlet_partition(LABELS, num_clients, alpha, np.random.RandomState(seed))
    theirs = creff_official(LABELS, num_clients, alpha, seed)
    assert len(ours) == len(theirs) == num_clients
    assert all(np.array_equal(a, np.sort(b)) for a, b in zip(ours, theirs))


def test_creff_partition_gives_equal_clients_with_label_skew():
    parts = creff_dirichlet_partition(LABELS, 20, 0.3, np.random.default_rng(0))
    assert_exact_cover(parts, len(LABELS))
    per, extra = divmod(len(LABELS), 20)
    assert extra > 0 and [len(p) for p in parts] == [per + 1] * extra + [per] * (20 - extra)
    counts = partition_counts(LABELS, parts, 10)
    assert (counts > 0).sum(1).mean() < 6  # α = 0.3: a client sees few of the 10 classes


def test_creff_partition_errors_are_one_line():
    with pytest.raises(FedLTError, match="num_clients >= 10"):
        creff_dirichlet_partition(LABELS, 8, 0.5, np.random.default_rng(0))
    with pytest.raises(FedLTError, match="fewer than 2 each"):
        creff_dirichlet_partition(LABELS[:30], 20, 0.5, np.random.default_rng(0))
    with pytest.raises(FedLTError, match="alpha"):
        creff_dirichlet_partition(LABELS, 10, 0.0, np.random.default_rng(0))
    with pytest.raises(FedLTError, match="at least 100 samples each"):  # 1,485 / 20 = 74 per client
        creff_dirichlet_partition(LABELS, 20, 0.5, np.random.default_rng(0), min_size=100)


# --------------------------------------------------------------------------- FedLoGe's / Fed-GraB's routine
def fedloge_official(y_train, num_classes, p, num_users, seed, alpha_dirichlet):
    """Transcription of ZackZikaiXiao/FedLoGe (and FedGraB) ``util/sampling.py`` ``non_iid_dirichlet_sampling``
    (numpy's global generator replaced by a RandomState of the same seed), sets of indices as there."""
    rs = np.random.RandomState(seed)
    p = 1
    phi = rs.binomial(1, p, size=(num_users, num_classes))
    n_classes_per_client = np.sum(phi, axis=1)
    while np.min(n_classes_per_client) == 0:
        invalid = np.where(n_classes_per_client == 0)[0]
        phi[invalid] = rs.binomial(1, p, size=(len(invalid), num_classes))
        n_classes_per_client = np.sum(phi, axis=1)
    psi = [list(np.where(phi[:, j] == 1)[0]) for j in range(num_classes)]
    num_clients_per_class = np.array([len(x) for x in psi])
    dict_users = {}
    for class_i in range(num_classes):
        all_idxs = np.where(y_train == class_i)[0]
        p_dirichlet = rs.dirichlet([alpha_dirichlet] * num_clients_per_class[class_i])
        assignment = rs.choice(psi[class_i], size=len(all_idxs), p=p_dirichlet.tolist())
        for client_k in psi[class_i]:
            dict_users[client_k] = dict_users.get(client_k, set()) | set(all_idxs[assignment == client_k])
    return dict_users


@pytest.mark.parametrize("num_clients,alpha,seed", [(10, 0.5, 3407), (40, 1.0, 1), (7, 0.1, 0)])
def test_multinomial_dirichlet_draws_fedloges_partition(num_clients, alpha, seed):
    """Given the same RandomState, fedlt's routine returns FedLoGe's clients."""
    ours = multinomial_dirichlet_partition(LABELS, num_clients, alpha, np.random.RandomState(seed), min_size=0)
    theirs = fedloge_official(LABELS, 10, 0.6, num_clients, seed, alpha)
    assert [set(p.tolist()) for p in ours] == [theirs.get(k, set()) for k in range(num_clients)]
    assert_exact_cover(ours, len(LABELS))


def test_multinomial_dirichlet_counts_are_multinomial_draws_not_cuts():
    """A class of 1,000 samples over 2 clients: the cut gives ⌊q·n⌋ exactly; the multinomial draw scatters around
    q·n with variance n·q(1−q) (over 200 seeds, the mean of (count − q·n)² ≈ n·q(1−q) ± 20 %)."""
    labels = np.zeros(1000, dtype=np.int64)
    sq, var = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        parts = multinomial_dirichlet_partition(labels, 2, 1.0, rng, min_size=0)
        q = np.random.default_rng(seed)
        q.binomial(1, 1.0, size=(2, 1))
        q0 = q.dirichlet(np.ones(2))[0]
        sq.append((len(parts[0]) - q0 * 1000) ** 2)
        var.append(1000 * q0 * (1 - q0))
    assert 0.8 < np.mean(sq) / np.mean(var) < 1.2


def test_multinomial_dirichlet_errors_are_one_line():
    with pytest.raises(FedLTError, match=r"^partition.method=multinomial_dirichlet \(α=0.01\) left client \d+ "
                                         r"with \d+ samples, fewer than partition.min_size=10"):
        multinomial_dirichlet_partition(LABELS, 40, 0.01, np.random.default_rng(0), min_size=10)
    with pytest.raises(FedLTError, match="alpha"):
        multinomial_dirichlet_partition(LABELS, 10, 0.0, np.random.default_rng(0))


def test_multinomial_dirichlet_partitioner_is_the_same_routine():
    from fedlt.data.flower_partitioners import MultinomialDirichletPartitioner

    part = MultinomialDirichletPartitioner(num_partitions=10, alpha=0.5, seed=0)
    part.dataset = FakeDataset({"label": LABELS.tolist()})
    ours = multinomial_dirichlet_partition(LABELS, 10, 0.5, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(part.partition_indices(), ours))
