"""Long-tailed subsets of a balanced training set (Cao et al., LDAM-DRW, NeurIPS 2019, `get_img_num_per_cls`)."""

from __future__ import annotations

import numpy as np

from fedlt.errors import FedLTError


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> np.ndarray:
    """Per-class counts with class 0 the head and IF = n_max / n_min, in the official float arithmetic
    (``img_max * imb_factor**(i / (C − 1.0))`` with ``imb_factor`` = 1/IF, then ``int()``):

    exp:  n_i = ⌊n_max · (1/IF)^(i/(C−1))⌋   (float64, truncated)
    step: the first ⌊C/2⌋ classes keep n_max, the rest ⌊n_max · (1/IF)⌋   (not n_max / IF: 98·(1/49) = 1.99…)

    An IF that leaves a class with no sample (IF > n_max, or the truncation at IF = n_max) is a :class:`FedLTError`.
    """
    if imbalance_factor < 1:
        raise FedLTError(f"data.imbalance_factor must be >= 1 (N_max/N_min), got {imbalance_factor}")
    if profile == "exp":
        exps = np.arange(num_classes, dtype=np.float64) / max(num_classes - 1, 1)
        counts = [int(n_max * (1.0 / imbalance_factor) ** e) for e in exps]
    elif profile == "step":
        half = num_classes // 2
        counts = [n_max] * half + [int(n_max * (1.0 / imbalance_factor))] * (num_classes - half)
    else:
        raise FedLTError(f"data.profile must be 'exp' or 'step', got {profile!r}")
    if min(counts, default=1) < 1:
        empty = next(c for c, n in enumerate(counts) if n < 1)
        raise FedLTError(f"data.imbalance_factor={imbalance_factor:g} leaves class {empty} with 0 of n_max={n_max} "
                         f"training samples; lower it (N_min = n_max / imbalance_factor must keep >= 1 sample)")
    return np.asarray(counts, dtype=np.int64)


def longtail_indices(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a long-tailed subset: for each class a seeded permutation, keeping its first ``counts[c]``."""
    chosen = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise FedLTError(f"class {c} has {len(idx)} training samples, fewer than the {n} the profile asks for")
        chosen.append(np.sort(rng.permutation(idx)[:n]))
    return np.concatenate(chosen)
