"""Client partitions of a (long-tailed) training set: Dirichlet label skew, shards, IID.

Each function returns one index array per client; together they cover every sample exactly once.

Two Dirichlet forms (``partition.balance``):

- plain per-class Dirichlet (the default, ``balance=false``; what flwr-datasets' ``DirichletPartitioner`` does
  by default): each class is dealt to the clients in Dir(α) proportions;
- NIID-Bench's balanced Dirichlet (``balance=true``; Li et al., ICDE 2022, used by GBME's release): a client
  already holding ≥ N/K samples gets no share of the classes dealt after. On long-tailed data the head class
  is dealt first, so balancing closes clients early and leaves some with the head class only.

CReFF's routine (``method=creff_dirichlet``, :func:`creff_dirichlet_partition`) is a third form: balanced
Dirichlet within groups of ten clients, then equal-size clients cut from the concatenation. FedLoGe's and
Fed-GraB's (``method=multinomial_dirichlet``, :func:`multinomial_dirichlet_partition`) is a fourth: each sample
goes to a client drawn from its class's Dir(α) proportions, with no redraw.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedlt.errors import FedLTError


def _check(n: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise FedLTError(f"partition.num_clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise FedLTError(f"cannot give {num_clients} clients at least {min_size} samples each "
                         f"from {n} training samples")


def _deal(class_indices: Iterable[np.ndarray], num_clients: int, alpha: float,
          rng: np.random.Generator | np.random.RandomState, capacity: float | None) -> list[list[int]]:
    """One Dirichlet deal: for each class's indices (in the iterable's order, drawn lazily so that any draw it
    makes comes before the class's q), q ~ Dir(α·1_K); with a ``capacity``, q_k ← 0 for clients already holding
    ≥ capacity and q renormalised (NIID-Bench's balance); the indices cut at cumsum(q)·n_c."""
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for idx in class_indices:
        q = rng.dirichlet(np.full(num_clients, alpha))
        if capacity is not None:
            q = q * np.array([len(p) < capacity for p in parts])
            q = q / q.sum()
        cuts = (np.cumsum(q) * len(idx)).astype(int)[:-1]
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].extend(piece.tolist())
    return parts


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
                        min_size: int = 10, balance: bool = False, max_tries: int = 1000) -> list[np.ndarray]:
    """Dirichlet(α) label skew: for each class c, q ~ Dir(α·1_K); with ``balance`` (NIID-Bench's form, used by
    GBME) q_k ← 0 for clients already holding ≥ N/K samples; the shuffled indices of c are cut at
    cumsum(q)·n_c. Redrawn until min_k n_k ≥ ``min_size``, at most ``max_tries`` (1000) times: then a one-line
    :class:`FedLTError` (NIID-Bench's and GBME's routine redraws for ever).
    """
    if alpha <= 0:
        raise FedLTError(f"partition.alpha must be > 0, got {alpha}")
    n, classes = len(labels), np.unique(labels)
    _check(n, num_clients, min_size)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    for _ in range(max_tries):
        parts = _deal((rng.permutation(by_class[c]) for c in classes), num_clients, alpha, rng,
                      n / num_clients if balance else None)
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise FedLTError(f"no Dirichlet(α={alpha}) partition into {num_clients} clients with at least {min_size} "
                     f"samples each after {max_tries} draws; raise alpha or lower num_clients/min_size")


def creff_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                              rng: np.random.Generator | np.random.RandomState, min_size: int = 1,
                              group_size: int = 10, max_tries: int = 1000) -> list[np.ndarray]:
    """CReFF-FL's client partition (Shang et al., IJCAI 2022; shangxinyi/CReFF-FL ``Dataset/sample_dirichlet.py``
    ``clients_indices``), also used by the federated long-tail work built on that code:

    1. shuffle the (index, label) pairs; cut them into G = ⌈K/10⌉ consecutive chunks of ⌊10·N/K⌋ pairs (the last
       chunk takes the rest), one per group of 10 clients (the last group has K − 10(G−1));
    2. in each chunk, NIID-Bench's balanced Dirichlet over its group (for every class c in 0..C−1: q ~ Dir(α·1),
       q_k ← 0 where client k already holds ≥ chunk/n; the chunk's indices of c, in shuffled order, cut at
       cumsum(q)·n_c), redrawn until every client of the group holds ≥ ⌊0.5·chunk/n⌋;
    3. concatenate the groups' clients' index lists in order and cut that list into K consecutive parts of
       ⌊N/K⌋ or ⌈N/K⌉ (the first N mod K parts are the larger ones).

    So every client holds N/K samples: the label skew comes from where the equal cuts fall in the concatenated
    Dirichlet lists. Given a ``np.random.RandomState`` it draws exactly the official numbers (tested); fedlt's
    runs pass their PARTITION ``Generator``. Two official behaviours are not copied: a chunk too small for the
    ⌊0.5·chunk/n⌋ rule to be ≥ 1 is silently dropped there (its samples belong to no client) and an impossible
    draw loops for ever; both are one-line :class:`FedLTError` here, as is ⌊N/K⌋ < ``min_size``.
    """
    if alpha <= 0:
        raise FedLTError(f"partition.alpha must be > 0, got {alpha}")
    if num_clients < group_size:
        raise FedLTError(f"partition.method=creff_dirichlet deals to groups of {group_size} clients and needs "
                         f"partition.num_clients >= {group_size}, got {num_clients}")
    n = len(labels)
    _check(n, num_clients, min_size)
    num_classes = int(labels.max()) + 1
    pairs = np.stack([np.arange(n), labels]).T.astype(np.int64)
    rng.shuffle(pairs)
    groups = -(-num_clients // group_size)
    step = int(group_size / num_clients * n)
    dealt: list[list[int]] = []
    for g in range(groups):
        chunk = pairs[g * step:(n if g == groups - 1 else (g + 1) * step)]
        workers = min(group_size, num_clients - g * group_size)
        floor = int(0.5 * len(chunk) / workers)
        if floor < 1:
            raise FedLTError(f"partition.method=creff_dirichlet: group {g} has {len(chunk)} samples for {workers} "
                             f"clients, fewer than 2 each; lower partition.num_clients")
        for _ in range(max_tries):
            parts = _deal((chunk[chunk[:, 1] == c, 0] for c in range(num_classes)), workers, alpha, rng,
                          len(chunk) / workers)
            if min(len(p) for p in parts) >= floor:
                break
        else:
            raise FedLTError(f"no creff_dirichlet draw (α={alpha}) gave every client of group {g} at least {floor} "
                             f"samples after {max_tries} draws; raise alpha")
        dealt.extend(parts)
    flat = np.asarray([i for p in dealt for i in p], dtype=np.int64)
    return [np.sort(p) for p in np.array_split(flat, num_clients)]


def multinomial_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                                    rng: np.random.Generator | np.random.RandomState,
                                    min_size: int = 1) -> list[np.ndarray]:
    """FedLoGe's and Fed-GraB's client partition (Xiao et al., ICLR 2024 / Xiao et al., NeurIPS 2023;
    ZackZikaiXiao/FedLoGe and ZackZikaiXiao/FedGraB ``util/sampling.py`` ``non_iid_dirichlet_sampling``, taken
    from FedCorr): for every class c in 0..C−1, q ~ Dir(α·1_K) and each sample of c goes to client k with
    probability q_k (one categorical draw per sample), so a client's count of c is Multinomial(n_c, q)-distributed
    rather than the cut ⌊cumsum(q)·n_c⌋ of :func:`dirichlet_partition`; nothing is redrawn.

    The release's class-choice matrix Φ ~ Bernoulli(p) is drawn with p forced to 1 (every client may hold every
    class), so it selects nothing; it is drawn here too, so that a ``np.random.RandomState`` seeded as the release
    seeds numpy gives its exact partition (tested). Not copied: a client left with fewer than ``min_size`` samples
    (the release trains it on what it got, even none) is a one-line :class:`FedLTError`.
    """
    if alpha <= 0:
        raise FedLTError(f"partition.alpha must be > 0, got {alpha}")
    n = len(labels)
    _check(n, num_clients, min_size)
    num_classes = int(labels.max()) + 1
    rng.binomial(1, 1.0, size=(num_clients, num_classes))  # the release's Φ with p = 1: every client, every class
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        q = rng.dirichlet(np.full(num_clients, alpha))
        owner = rng.choice(num_clients, size=len(idx), p=q)
        for k in range(num_clients):
            parts[k].extend(idx[owner == k].tolist())
    small = [k for k, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise FedLTError(f"partition.method=multinomial_dirichlet (α={alpha}) left client {small[0]} with "
                         f"{len(parts[small[0]])} samples, fewer than partition.min_size={min_size} (it draws once, "
                         f"as FedLoGe's release): change the seed, raise alpha or lower num_clients/min_size")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def shard_partition(labels: np.ndarray, num_clients: int, shards_per_client: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Shards (McMahan et al., 2017): sort by label, cut into K·s near-equal shards, deal s at random to each client."""
    if shards_per_client < 1:
        raise FedLTError(f"partition.shards_per_client must be >= 1, got {shards_per_client}")
    _check(len(labels), num_clients)
    if num_clients * shards_per_client > len(labels):
        raise FedLTError(f"cannot cut {num_clients} clients × {shards_per_client} shards = "
                         f"{num_clients * shards_per_client} shards of at least one sample from {len(labels)} "
                         f"training samples; lower partition.shards_per_client")
    order = np.lexsort((rng.permutation(len(labels)), labels))  # by label, random within a label
    shards = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


def iid_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded random split into near-equal clients."""
    _check(len(labels), num_clients)
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


def partition_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Client × class count matrix."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
