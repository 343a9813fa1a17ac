"""fedlt's partitions as flwr-datasets ``Partitioner``s, for Flower users who load data with ``FederatedDataset``.

    from flwr_datasets import FederatedDataset
    from fedlt.data.flower_partitioners import LongTailPartitioner

    fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={
        "train": LongTailPartitioner(num_partitions=10, imbalance_factor=100, alpha=0.5)})
    client_0 = fds.load_partition(0)

- :class:`DirichletLabelPartitioner`: per-class Dirichlet(α) label skew (fedlt/data/partition.py), plain (the
  default, as flwr-datasets' ``DirichletPartitioner``) or NIID-Bench's balanced form (``balance=True``);
  redraws until every partition holds ``min_partition_size`` samples, at most ``max_tries`` times;
- :class:`ShardsPartitioner`: McMahan et al.'s label-sorted shards;
- :class:`LongTailPartitioner`: first a long-tailed subset of the classes (n_c = n_max·IF^(−c/(C−1)), class
  order = sorted label values, the first the head; LDAM-DRW's profile, fedlt/data/longtail.py), then the
  Dirichlet partition above of that subset (``alpha=None``: an IID split). Samples outside the subset belong
  to no partition. flwr-datasets has no long-tailed partitioner.

The interface is flwr-datasets' ``Partitioner`` (``dataset`` set once, ``load_partition(partition_id)``,
``num_partitions``): with ``flwr_datasets`` installed these classes subclass it; without it (it needs Hugging
Face ``datasets``, which fedlt does not depend on) they subclass a stand-in of the same shape, and accept any
object with ``len()``, column access ``dataset[column]`` and ``select(indices)`` — a ``datasets.Dataset`` is one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlt.data import partition as P
from fedlt.data.longtail import longtail_counts, longtail_indices
from fedlt.errors import FedLTError

try:  # the real base class where flwr-datasets is installed
    from flwr_datasets.partitioner import Partitioner as _Base
except ImportError:  # pragma: no cover - exercised where flwr-datasets is absent (this project's CI)
    class _Base:  # type: ignore[no-redef]
        """Stand-in for ``flwr_datasets.partitioner.Partitioner`` (same attributes and errors)."""

        def __init__(self) -> None:
            self._dataset: Any = None

        @property
        def dataset(self) -> Any:
            if self._dataset is None:
                raise AttributeError("The dataset field should be set before using it (directly, via "
                                     "`load_partition` or some other method).")
            return self._dataset

        @dataset.setter
        def dataset(self, value: Any) -> None:
            if self._dataset is not None:
                raise ValueError("The dataset should be assigned only once to the partitioner.")
            self._dataset = value

        def is_dataset_assigned(self) -> bool:
            return self._dataset is not None


class _LabelPartitioner(_Base):
    """Computes every partition once, from the label column, on the first ``load_partition``."""

    def __init__(self, num_partitions: int, partition_by: str = "label", seed: int | None = 42) -> None:
        super().__init__()
        if num_partitions < 1:
            raise FedLTError(f"num_partitions must be >= 1, got {num_partitions}")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._seed = seed
        self._parts: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _labels(self) -> np.ndarray:
        """The label column as integer codes 0..C−1 in sorted order of the label values."""
        _, codes = np.unique(np.asarray(self.dataset[self._partition_by]), return_inverse=True)
        return codes.astype(np.int64)

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def partition_indices(self) -> list[np.ndarray]:
        """Every partition's row indices into ``dataset`` (sorted)."""
        if self._parts is None:
            self._parts = self._partition(self._labels(), np.random.default_rng(self._seed))
        return self._parts

    def load_partition(self, partition_id: int) -> Any:
        if not 0 <= partition_id < self._num_partitions:
            raise FedLTError(f"partition_id must be in 0..{self._num_partitions - 1}, got {partition_id}")
        return self.dataset.select(self.partition_indices()[partition_id].tolist())


class DirichletLabelPartitioner(_LabelPartitioner):
    """Per-class Dirichlet(α) label skew; ``balance=True``: NIID-Bench's balanced form (GBME's protocol)."""

    def __init__(self, num_partitions: int, alpha: float, partition_by: str = "label", min_partition_size: int = 10,
                 balance: bool = False, max_tries: int = 1000, seed: int | None = 42) -> None:
        super().__init__(num_partitions, partition_by, seed)
        self._alpha, self._min_size, self._balance, self._max_tries = alpha, min_partition_size, balance, max_tries

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return P.dirichlet_partition(labels, self._num_partitions, self._alpha, rng, self._min_size, self._balance,
                                     self._max_tries)


class CReFFDirichletPartitioner(_LabelPartitioner):
    """CReFF-FL's routine (balanced Dirichlet(α) in groups of 10 partitions, then equal-size partitions cut from
    the concatenation; :func:`fedlt.data.partition.creff_dirichlet_partition`)."""

    def __init__(self, num_partitions: int, alpha: float, partition_by: str = "label", seed: int | None = 42) -> None:
        super().__init__(num_partitions, partition_by, seed)
        self._alpha = alpha

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return P.creff_dirichlet_partition(labels, self._num_partitions, self._alpha, rng)


class MultinomialDirichletPartitioner(_LabelPartitioner):
    """FedLoGe's and Fed-GraB's routine (each sample to a partition drawn from its class's Dir(α) proportions,
    drawn once; :func:`fedlt.data.partition.multinomial_dirichlet_partition`)."""

    def __init__(self, num_partitions: int, alpha: float, partition_by: str = "label", min_partition_size: int = 1,
                 seed: int | None = 42) -> None:
        super().__init__(num_partitions, partition_by, seed)
        self._alpha, self._min_size = alpha, min_partition_size

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return P.multinomial_dirichlet_partition(labels, self._num_partitions, self._alpha, rng, self._min_size)


class ShardsPartitioner(_LabelPartitioner):
    """Label-sorted shards, ``shards_per_partition`` dealt at random to each partition (McMahan et al., 2017)."""

    def __init__(self, num_partitions: int, shards_per_partition: int = 2, partition_by: str = "label",
                 seed: int | None = 42) -> None:
        super().__init__(num_partitions, partition_by, seed)
        self._shards = shards_per_partition

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return P.shard_partition(labels, self._num_partitions, self._shards, rng)


class LongTailPartitioner(_LabelPartitioner):
    """A long-tailed subset of the classes (β = ``imbalance_factor``, ``profile`` exp or step, head count
    ``n_max``, default the smallest class's count), split into ``num_partitions`` by Dirichlet(``alpha``)
    (``alpha=None``: IID). ``num_partitions=1`` gives the long-tailed set itself."""

    def __init__(self, num_partitions: int, imbalance_factor: float, alpha: float | None = 0.5,
                 partition_by: str = "label", profile: str = "exp", n_max: int | None = None,
                 min_partition_size: int = 10, balance: bool = False, max_tries: int = 1000,
                 seed: int | None = 42) -> None:
        super().__init__(num_partitions, partition_by, seed)
        self._if, self._alpha, self._profile, self._n_max = imbalance_factor, alpha, profile, n_max
        self._min_size, self._balance, self._max_tries = min_partition_size, balance, max_tries

    def _partition(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        per_class = np.bincount(labels)
        n_max = self._n_max or int(per_class.min())
        subset = np.sort(longtail_indices(labels, longtail_counts(n_max, len(per_class), self._if, self._profile), rng))
        if self._num_partitions == 1:
            return [subset]
        if self._alpha is None:
            parts = P.iid_partition(labels[subset], self._num_partitions, rng)
        else:
            parts = P.dirichlet_partition(labels[subset], self._num_partitions, self._alpha, rng, self._min_size,
                                          self._balance, self._max_tries)
        return [subset[p] for p in parts]
