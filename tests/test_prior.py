"""Server-side prior estimation, grouping and expert cohorts on hand-made inputs (GBME, Zeng et al., ICCV 2023)."""

import numpy as np
import pytest
import torch
from torch import nn

from fedlt.models.base import NormedLinear
from fedlt.models.experts import small_cnn_experts
from strategies.gbme.prior import (
    class_scores,
    classifier_weight_dc,
    estimate_prior,
    group_clients,
    prior_error,
    prior_report,
    sample_expert_cohort,
)


def test_class_scores_sum_over_features_and_clip():
    dw = np.array([[1.0, -2.0, 0.0], [2.0, 1.0, 0.0]])  # (d=2, C=3)
    np.testing.assert_allclose(class_scores(dw), [3.0, 1e-5, 1e-5])


def test_estimate_prior_by_hand():
    w0 = np.zeros((2, 3))
    w1 = np.array([[3.0, 1.0, -1.0], [3.0, 0.0, -1.0]])  # s = [6, 1, clip] -> p ≈ [6, 1, 1e-5]/7
    w2 = np.array([[0.0, 0.0, 2.0], [0.0, 2.0, 2.0]])  # s = [clip, 2, 4] -> p ≈ [0, 1/3, 2/3]
    est = estimate_prior(w0, [w1, w2], [70, 30])
    np.testing.assert_allclose(est.p_hat[0], np.array([6, 1, 1e-5]) / (7 + 1e-5))
    np.testing.assert_allclose(est.n_hat, [[60, 10, 0], [0, 10, 20]])
    np.testing.assert_allclose(est.counts, [60, 20, 20])
    np.testing.assert_allclose(est.pi_hat, [0.6, 0.2, 0.2])


def test_count_floor_of_five():
    w0 = np.zeros((1, 3))
    est = estimate_prior(w0, [np.array([[100.0, 1.0, -5.0]])], [101])  # n̂ = [100, 1, 0]
    np.testing.assert_allclose(est.counts, [100, 5, 5])
    np.testing.assert_allclose(est.pi_hat, np.array([100, 5, 5]) / 110)


def test_estimate_does_not_mutate_inputs():
    w0, w = np.ones((2, 2)), np.full((2, 2), 3.0)
    w0c, wc = w0.copy(), w.copy()
    estimate_prior(w0, [w], [10])
    np.testing.assert_array_equal(w0, w0c)
    np.testing.assert_array_equal(w, wc)


def test_classifier_layouts_and_expert_mean():
    lin = nn.Linear(4, 3)
    model = nn.Module()
    model.classifier = lin
    np.testing.assert_allclose(classifier_weight_dc(model), lin.weight.detach().numpy().T, rtol=1e-6)
    normed = nn.Module()
    normed.classifier = NormedLinear(4, 3)
    assert classifier_weight_dc(normed).shape == (4, 3)
    experts = small_cnn_experts(3, 1, num_experts=2)
    expected = np.mean([e.classifier.weight.detach().double().numpy() for e in experts.experts], axis=0)
    before = [e.classifier.weight.detach().clone() for e in experts.experts]
    np.testing.assert_allclose(classifier_weight_dc(experts), expected)
    for b, e in zip(before, experts.experts):  # the model is read, never changed in place
        assert torch.equal(b, e.classifier.weight)


def test_weight_change_recovers_counts():
    """The estimator's premise: a CE step on non-negative features raises the column sums of held classes."""
    torch.manual_seed(0)
    clf = nn.Linear(8, 3)
    w0 = clf.weight.detach().numpy().T.copy()
    h, y = torch.rand(40, 8), torch.tensor([0] * 30 + [1] * 10)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    nn.functional.cross_entropy(clf(h), y).backward()
    opt.step()
    est = estimate_prior(w0, [clf.weight.detach().numpy().T], [40])
    assert est.n_hat[0, 0] > est.n_hat[0, 1] > 0 and est.n_hat[0, 2] == 0


def test_grouping_sorted_descending_contiguous():
    p_hat = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    counts = np.array([100.0, 10.0])  # scores: 10, 100, 55, 91, 28
    groups, scores = group_clients(p_hat, counts, 3, "array_split")
    np.testing.assert_allclose(scores, [10, 100, 55, 91, 28])
    assert groups == [[1, 3], [2, 4], [0]]


def official_groups(scores: list[float], client_num: int, expert_num: int) -> list[list[int]]:
    """Transcription of ``specifical_exp`` (Spinozaaa/Federated-Long-tailed-Learning fedavg_api.py): sort
    (score, id) pairs descending by score, cut at int(K·i/E)."""
    pairs = [(s, i) for i, s in enumerate(scores)]
    pairs.sort(reverse=True, key=lambda x: x[0])
    ids = [i[1] for i in pairs]
    return [ids[int(client_num * i / expert_num):int(client_num * (i + 1) / expert_num)] for i in range(expert_num)]


@pytest.mark.parametrize("k,e", [(5, 3), (10, 3), (100, 3), (7, 4), (3, 3)])
def test_grouping_follows_official_cut(k, e):
    rng = np.random.default_rng(k * 10 + e)
    p_hat = rng.dirichlet(np.ones(4), size=k)
    counts = rng.integers(1, 500, 4).astype(float)
    groups, scores = group_clients(p_hat, counts, e)  # the default rule is the official one
    assert groups == official_groups(list(p_hat @ counts), k, e)
    if k % e:
        assert len(groups[-1]) == max(len(g) for g in groups) > len(groups[0])  # the extra client goes to the tail


def test_prior_error():
    err = prior_error([0.5, 0.5], [0.75, 0.25])
    assert err["l1"] == pytest.approx(0.5)
    assert err["kl"] == pytest.approx(0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25))
    assert prior_error([1, 0], [0.5, 0.5])["kl"] == pytest.approx(np.log(2))
    rep = prior_report(estimate_prior(np.zeros((1, 2)), [np.array([[3.0, 1.0]])], [40]), np.array([3, 1]))
    assert rep["prior_l1"] == pytest.approx(0) and rep["true_prior"] == [0.75, 0.25]


def official_cohort_sizes(group: list[int], per_round: int, beta: float) -> tuple[int, int]:
    """Spinozaaa/Federated-Long-tailed-Learning ``fedml_api/clsimb_fedavg/fedavg_api.py`` (``train``, the expert
    loop): (clients of the group, other clients) of an expert's cohort, in its floating point."""
    if per_round * beta >= len(group):
        return len(group), int(per_round * beta - len(group))
    return int(per_round * beta), int(per_round * (1 - beta))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("group,num_clients,per_round,beta", [
    (list(range(10, 43)), 100, 20, 0.8),  # gbme_cifar100_lt.yaml: 16 + int(3.99…) = 19
    ([0, 1, 2], 10, 5, 0.8), ([3, 4, 5, 6], 10, 5, 0.8),  # gbme_cifar10_lt.yaml's groups: the group + the rest of 4
    ([0, 1], 4, 3, 0.8), (list(range(30)), 100, 10, 0.5)])
def test_expert_cohort_has_the_releases_size_all_distinct(seed, group, num_clients, per_round, beta):
    cohort = sample_expert_cohort(np.random.default_rng(seed), group, num_clients, per_round, beta)
    in_group, others = official_cohort_sizes(group, per_round, beta)
    assert len(cohort) == len(set(cohort)) == in_group + others
    assert sum(k in group for k in cohort) >= in_group  # the others: any client not yet chosen, as the release
    assert cohort == sorted(cohort)
