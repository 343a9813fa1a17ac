import numpy as np
import pytest

from fedlt.data.longtail import longtail_counts, longtail_indices
from fedlt.errors import FedLTError


@pytest.mark.parametrize("n_max,c,beta,total", [
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431),
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573),
    (6000, 10, 100, 14886),
])
def test_exponential_profile_totals_match_the_literature(n_max, c, beta, total):
    counts = longtail_counts(n_max, c, beta)
    assert counts.sum() == total
    assert counts[0] == n_max and counts[-1] == int(n_max / beta)


def test_cifar10_if100_per_class_counts():
    assert longtail_counts(5000, 10, 100).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_step_profile():
    assert longtail_counts(100, 4, 10, "step").tolist() == [100, 100, 10, 10]


def test_step_profile_truncates_as_the_official_code():
    """LDAM-DRW: int(img_max * imb_factor) with imb_factor = 1/49: 98 · 0.0204081… = 1.9999999999999998 → 1
    (⌊98 / 49⌋ would be 2), the same tail count as the exp profile's last class."""
    assert longtail_counts(98, 4, 49, "step").tolist() == [98, 98, 1, 1]
    assert longtail_counts(98, 4, 49)[-1] == 1


@pytest.mark.parametrize("n_max,c,beta,profile", [(5000, 10, 1e6, "exp"), (500, 100, 1000, "exp"),
                                                   (49, 10, 49, "exp"), (100, 4, 101, "step")])
def test_a_beta_that_empties_a_class_is_a_one_line_error(n_max, c, beta, profile):
    with pytest.raises(FedLTError, match=r"leaves class \d+ with 0 of n_max") as err:
        longtail_counts(n_max, c, beta, profile)
    assert "\n" not in str(err.value)


def test_a_list_long_tailed_already_is_told_to_take_profile_none():
    from fedlt.config import load_config
    from fedlt.experiment import longtail_subset

    cfg = load_config(None, ["data.name=file_list", "data.imbalance_factor=10"])
    labels = np.repeat(np.arange(5), [40, 30, 3, 2, 2])  # ImageNet-LT-like: n_max = 40, class 2 below its 12
    with pytest.raises(FedLTError, match="class 2 has 3 .* takes data.profile=none"):
        longtail_subset(cfg, labels, 5)


def test_balanced_when_beta_is_one():
    assert longtail_counts(50, 5, 1).tolist() == [50] * 5


def test_beta_below_one_is_an_error():
    with pytest.raises(FedLTError, match="imbalance_factor"):
        longtail_counts(5000, 10, 0.5)


def test_indices_are_deterministic_per_seed_and_have_the_counts():
    labels = np.repeat(np.arange(4), 30)
    counts = np.array([30, 12, 5, 2])
    a = longtail_indices(labels, counts, np.random.default_rng(0))
    b = longtail_indices(labels, counts, np.random.default_rng(0))
    c = longtail_indices(labels, counts, np.random.default_rng(1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == counts.tolist()
    assert len(np.unique(a)) == len(a)


def test_more_than_available_is_an_error():
    with pytest.raises(FedLTError, match="class 1"):
        longtail_indices(np.array([0, 0, 1]), np.array([2, 2]), np.random.default_rng(0))
