"""strategy.prior = gbme | dpa | dp_counts | oracle (strategies/global_prior.py) on hand-made inputs, and each
choice through a tiny in-process run of post-hoc calibration."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.federation.dp import epsilon
from strategies.global_prior import (
    analytic_gaussian_sigma,
    dp_counts_estimate,
    dpa_estimate,
    floored_prior,
    gaussian_sigma,
    noisy_counts,
    prior_errors,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_dp_counts_sigma_meets_the_stated_budget():
    """σ for (ε, δ) = (1, 1e-5) and Δ = 1: one release at that σ spends at most ε by the same RDP accountant
    (and not much less: the search is tight); σ scales with the sensitivity."""
    sigma = gaussian_sigma(1.0, 1e-5)
    eps, _ = epsilon(1.0, sigma, 1, 1e-5)
    assert 0.97 <= eps <= 1.0
    assert epsilon(1.0, 0.9 * sigma, 1, 1e-5)[0] > 1.0
    assert gaussian_sigma(1.0, 1e-5, sensitivity=2.0) == pytest.approx(2 * sigma)
    assert gaussian_sigma(4.0, 1e-5) < sigma  # more budget, less noise


def test_analytic_gaussian_sigma_spends_exactly_delta():
    """Balle & Wang (ICML 2018) Thm 8 at the returned σ: δ(σ) = δ to within the bisection's tolerance, and a
    smaller σ spends more; 3.73 at (1, 1e-5), below the RDP calibration; σ scales with Δ."""
    from scipy.stats import norm

    def spent(s, eps=1.0):
        return norm.cdf(1 / (2 * s) - eps * s) - np.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)

    s = analytic_gaussian_sigma(1.0, 1e-5)
    assert s == pytest.approx(3.7306, abs=1e-3) and s < gaussian_sigma(1.0, 1e-5)
    assert spent(s) <= 1e-5 < spent(0.999 * s)
    assert analytic_gaussian_sigma(1.0, 1e-5, sensitivity=3.0) == pytest.approx(3 * s, rel=1e-6)


def test_noisy_counts_query_adds_gaussian_noise_on_the_client():
    from fedlt.train import TensorData

    labels = torch.tensor([0] * 30 + [1] * 7 + [3] * 2)
    data = TensorData(torch.zeros(39, 1, 2, 2, dtype=torch.uint8), labels, torch.zeros(1), torch.ones(1), 4)
    exact = noisy_counts(None, None, data, {"sigma": 0.0}, torch.Generator().manual_seed(0), None)
    assert exact.metrics["noisy-counts"] == [30.0, 7.0, 0.0, 2.0] and exact.state == {}
    draws = np.array([noisy_counts(None, None, data, {"sigma": 3.0}, torch.Generator().manual_seed(s), None)
                      .metrics["noisy-counts"] for s in range(2000)])
    np.testing.assert_allclose(draws.mean(0), [30, 7, 0, 2], atol=0.3)
    np.testing.assert_allclose(draws.std(0), 3.0, rtol=0.06)


def test_dp_counts_estimate_by_hand():
    est = dp_counts_estimate([np.array([10.0, 2.5, -3.0]), np.array([20.0, -1.0, 1.0])])
    np.testing.assert_allclose(est.counts, [30.0, 1.5, 1.0])  # Σ, floored at 1
    np.testing.assert_allclose(est.pi_hat, np.array([30.0, 1.5, 1.0]) / 32.5)
    np.testing.assert_allclose(est.p_hat[0], [10 / 12.5, 2.5 / 12.5, 0])


def test_dpa_estimate_reads_the_n_weighted_mean_classifier_and_floors_the_smallest_class():
    w0 = np.zeros((2, 3))  # (d, C)
    wa = np.array([[4.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # column norms 4, 0, 1
    wb = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]])  # 0, 2, 1
    est = dpa_estimate(w0, [wa, wb], [300, 100])
    mean = 0.75 * wa + 0.25 * wb  # column norms 3, 0.5, sqrt(0.75² + 0.25²)
    norms = np.linalg.norm(mean, axis=0)
    a = (norms - norms.mean()) / norms.std()
    a = a - a.min()
    np.testing.assert_allclose(est.p_hat[0], a / a.sum())
    np.testing.assert_allclose(est.pi_hat, floored_prior(a / a.sum(), 400))
    assert est.pi_hat[1] == pytest.approx((5 / 400) / (1 + 5 / 400))  # 0 -> 5 of 400, renormalised


def test_prior_errors_few_shot_relative_error():
    pi, pi_hat = np.array([0.7, 0.2, 0.1]), np.array([0.6, 0.2, 0.2])
    e = prior_errors(pi, pi_hat, np.array([False, True, True]))
    assert e["l1"] == pytest.approx(0.2)
    assert e["kl"] == pytest.approx(0.7 * np.log(0.7 / 0.6) + 0.1 * np.log(0.1 / 0.2))
    assert e["few_rel_err"] == pytest.approx((0 + 1.0) / 2)


def test_the_choice_is_a_config_key_of_every_strategy_with_a_global_prior():
    for name, extra in (("gbme", ["model.name=small_cnn_experts"]), ("posthoc_calibration", []), ("fedgrab", [])):
        for prior in ("gbme", "dpa", "dp_counts", "dp_counts_agm", "oracle"):
            cfg = load_config(None, [f"strategy.name={name}", f"strategy.prior={prior}", *extra])
            assert cfg.strategy.prior == prior
        with pytest.raises(FedLTError, match="strategy.prior"):
            load_config(None, [f"strategy.name={name}", "strategy.prior=counts", *extra])
        with pytest.raises(FedLTError, match="strategy.prior_epsilon"):
            load_config(None, [f"strategy.name={name}", "strategy.prior_epsilon=0", *extra])
    assert load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts",
                              "strategy.prior=estimated"]).strategy.prior == "gbme"  # the former name


def test_gbme_balances_with_the_chosen_estimate():
    from strategies.gbme import GBME
    from strategies.gbme.prior import PriorEstimate

    cfg = load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts", "strategy.prior=dp_counts"])
    s = GBME(cfg, 10)
    own, chosen = np.full(10, 0.1), np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum()
    s.prior = PriorEstimate(np.zeros((1, 10)), np.zeros((1, 10)), np.ones(10), own)
    s.balance = PriorEstimate(np.zeros((1, 10)), np.zeros((1, 10)), np.ones(10), chosen)
    np.testing.assert_allclose(s.train_config(3, 0)["log-prior"], np.log(chosen))
    resumed = GBME(cfg, 10)
    resumed.load_state_dict(s.state_dict())
    np.testing.assert_allclose(resumed.train_config(3, 0)["log-prior"], np.log(chosen))


@pytest.mark.parametrize("prior", ["dpa", "dp_counts", "dp_counts_agm", "oracle"])
def test_posthoc_calibration_with_each_estimator(prior, tmp_path):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    cfg = tiny_config(write_tiny_lists(tmp_path / "tiny"), "strategy.name=posthoc_calibration",
                      f"strategy.prior={prior}", "federation.rounds=1")
    summary, _ = simulate(cfg, tmp_path / "run")
    assert summary["prior_estimator"] == prior
    assert summary["posthoc_estimated_prior"]["accuracy"] == pytest.approx(summary["accuracy"])
    if prior == "oracle":
        assert summary["prior_l1"] == pytest.approx(0, abs=1e-12)
        assert summary["posthoc_estimated_prior"] == summary["posthoc_true_prior"]
    else:
        assert summary["prior_l1"] > 0
    assert ("prior_privacy" in summary) == prior.startswith("dp_counts")
    if prior.startswith("dp_counts"):
        assert summary["prior_privacy"]["epsilon"] == 1.0 and summary["prior_privacy"]["sensitivity"] == 1.0
