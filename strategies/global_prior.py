"""The global class prior π a long-tail strategy uses, estimated by one of four means (``strategy.prior``):

- ``gbme``: GBME's estimate from the clients' classifier-weight changes after one CE epoch from θ0
  (Zeng et al., ICCV 2023; :mod:`strategies.gbme.prior`);
- ``dpa``: Fed-GraB's Direct Prior Analyzer (Xiao et al., NeurIPS 2023; official ZackZikaiXiao/FedGraB,
  ``util/wene.py`` ``WENO.weno_estimation``): the L2 norm of each class's row of a classifier weight,
  z-scored, shifted by its minimum when that is negative, and normalised, π̂_c = a_c / Σ_j a_j. Here it reads
  the classifier the same one-epoch query produces, averaged over the clients as FedAvg would (weights n_k);
  the release defines the analyzer but never calls it. Its smallest class gets exactly 0, so π̂ is floored at
  5 / Σ_k n_k (GBME's floor of 5 samples) and renormalised;
- ``dp_counts``: every client sends its class counts plus Gaussian noise N(0, σ²·I) drawn on the client (no
  count leaves a client without noise); the server sums them, Ñ_c = max(1, Σ_k ñ_kc), π̂ = Ñ / Σ Ñ. A client's
  count vector changes by one in one class when one of its samples is added or removed: L2 sensitivity Δ = 1,
  so the release is (ε, δ)-DP per client at sample level with σ = Δ·σ_RDP(ε, δ), σ_RDP from Opacus' RDP
  accountant for one Gaussian release (``strategy.prior_epsilon``, ``strategy.prior_delta``);
- ``dp_counts_agm``: the same release with σ from the analytic Gaussian mechanism (Balle & Wang, "Improving the
  Gaussian Mechanism for Differential Privacy", ICML 2018, Theorem 8): the smallest σ with
  Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) ≤ δ, which is exactly (ε, δ)-DP for one Gaussian release (σ = 3.73
  against RDP's 4.05 at ε = 1, δ = 1e-5): the same privacy with 8 % less noise;
- ``oracle``: the true training prior (no server knows it): an ablation measuring what the estimate costs.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from pydantic import Field
from torch import nn

from fedlt.client_method import FitResult
from fedlt.config import Config
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.queries import QUERIES
from fedlt.federation.records import load_into
from fedlt.federation.strategy import FedLTStrategy, round_lr
from fedlt.options import Options
from fedlt.train import Augment, TensorData
from strategies.gbme.prior import COUNT_FLOOR, PriorEstimate, classifier_weight_dc, estimate_prior, prior_error

PriorName = Literal["gbme", "dpa", "dp_counts", "dp_counts_agm", "oracle"]
DPA_ASSUMED_TOTAL = 10000  # WENO.assump_num: the release scales proportions to 10 000 samples


class GlobalPriorOptions(Options):
    """The keys of a strategy that uses a global prior (mixed into its ``Options``)."""

    prior: PriorName = Field("gbme", description="global-prior estimator: gbme, dpa, dp_counts, dp_counts_agm, oracle")
    prior_epsilon: float = Field(1.0, gt=0, description="ε of the dp_counts release (per client, sample level)")
    prior_delta: float = Field(1e-5, gt=0, lt=1, description="δ of the dp_counts release")

    def unused(self, cfg, section: str) -> list[str]:
        out = super().unused(cfg, section)
        if not self.prior.startswith("dp_counts"):
            out += self.unread(section, ("prior_epsilon", "prior_delta"), f"{section}.prior={self.prior} (the "
                                                                           f"dp_counts priors read ε and δ)")
        return out


# --------------------------------------------------------------------------- DPA (Fed-GraB)
def dpa_proportions(weight_cd: np.ndarray) -> np.ndarray:
    """One call of the release's ``weno_estimation`` on a (C, d) classifier weight: a = z-score of ‖W_c‖₂
    (population std); a ← a − min a if min a < 0; return a / Σ a."""
    norms = np.linalg.norm(np.asarray(weight_cd, dtype=np.float64), axis=1)
    a = (norms - norms.mean()) / norms.std()
    if a.min() < 0:
        a = a - a.min()
    return a / a.sum()


class DirectPriorAnalyzer:
    """The release's running estimate: each call adds p·10000 to a per-class sum; the estimate is sum / calls."""

    def __init__(self, num_classes: int) -> None:
        self.class_sum = np.zeros(num_classes)
        self.calls = 0

    def update(self, weight_cd: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.class_sum += dpa_proportions(weight_cd) * DPA_ASSUMED_TOTAL
        return self.estimate()

    def estimate(self) -> np.ndarray:
        """Estimated class sizes out of 10 000 (the release's ``class_wise_num_for_3shot_calc``)."""
        return self.class_sum / max(self.calls, 1)

    def state_dict(self) -> dict:
        return {"class_sum": torch.from_numpy(self.class_sum.copy()), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.class_sum = np.asarray(state["class_sum"], dtype=np.float64)
        self.calls = int(state["calls"])


def floored_prior(p: np.ndarray, total: float) -> np.ndarray:
    """π̂ = max(p, 5/total) renormalised (GBME's floor of 5 samples out of ``total``)."""
    p = np.maximum(np.asarray(p, dtype=np.float64), COUNT_FLOOR / total)
    return p / p.sum()


def dpa_estimate(w0: np.ndarray, client_weights: list[np.ndarray], client_sizes: list[int]) -> PriorEstimate:
    """DPA on the n_k-weighted mean of the clients' (d, C) classifier weights (one FedAvg step's classifier)."""
    n = np.asarray(client_sizes, dtype=np.float64)
    mean_dc = np.tensordot(n / n.sum(), np.stack([np.asarray(w, dtype=np.float64) for w in client_weights]), axes=1)
    p = dpa_proportions(mean_dc.T)
    pi_hat = floored_prior(p, n.sum())
    return PriorEstimate(p[None], (p * n.sum())[None], pi_hat * n.sum(), pi_hat)


# --------------------------------------------------------------------------- DP counts
def gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """σ of one Gaussian release of a vector with L2 sensitivity Δ that is (ε, δ)-DP: Δ times the noise
    multiplier Opacus' RDP accountant gives for one release at sampling rate 1."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order is the")
        return sensitivity * float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                                        steps=1, accountant="rdp", epsilon_tolerance=0.001))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest σ (to 1e-9 relative, by bisection) with δ(σ) = Φ(Δ/2σ − εσ/Δ) − e^ε·Φ(−Δ/2σ − εσ/Δ) ≤ δ:
    one Gaussian release at σ is then exactly (ε, δ)-DP (Balle & Wang, ICML 2018, Theorem 8)."""
    from scipy.stats import norm

    def spent(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return float(norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b))

    lo, hi = 1e-6 * sensitivity, 1e6 * sensitivity
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > delta else (lo, mid)
    return hi


def dp_counts_estimate(noisy_counts: list[np.ndarray]) -> PriorEstimate:
    """Ñ_c = max(1, Σ_k ñ_kc) and π̂ = Ñ / Σ Ñ from the clients' noisy count vectors."""
    n = np.stack([np.asarray(c, dtype=np.float64) for c in noisy_counts])
    counts = np.maximum(1.0, n.sum(axis=0))
    p_k = np.maximum(n, 0)
    p_k = p_k / np.maximum(p_k.sum(axis=1, keepdims=True), 1e-12)
    return PriorEstimate(p_k, n, counts, counts / counts.sum())


@QUERIES.register("noisy-counts")
def noisy_counts(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                 augment: Augment) -> FitResult:
    """A client's answer: its class counts plus N(0, σ²) per class, σ = ``config['sigma']``, drawn here."""
    counts = data.class_counts.double()
    noise = torch.randn(len(counts), generator=generator, dtype=torch.float64) * float(config["sigma"])
    return FitResult(state={}, metrics={"num-examples": len(data), "noisy-counts": (counts + noise).tolist()})


# --------------------------------------------------------------------------- the choice
def oracle_estimate(cfg: Config) -> PriorEstimate:
    counts = np.asarray(experiment_for(cfg).train_counts, dtype=np.float64)
    return PriorEstimate(counts[None] / counts.sum(), counts[None], counts, counts / counts.sum())


def query_classifiers(strategy: FedLTStrategy, grid: Grid, arrays: ArrayRecord
                      ) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """GBME's query round: θ0's (d, C) classifier and every client's after one CE epoch, with n_k."""
    model = load_into(model_for(strategy.cfg, experiment_for(strategy.cfg)), arrays)
    replies = strategy.query(grid, list(range(strategy.num_clients)), arrays, "prior-epoch",
                             {"lr": round_lr(strategy.cfg, 1)})
    return (classifier_weight_dc(model), [r.content["classifier"]["weight"].numpy() for r in replies],
            [int(r.content["metrics"]["num-examples"]) for r in replies])


def estimate_global_prior(strategy: FedLTStrategy, grid: Grid, arrays: ArrayRecord, name: str,
                          classifiers: tuple | None = None) -> tuple[PriorEstimate, dict]:
    """π̂ by estimator ``name`` (``arrays``, θ0, is only read) and what the run reports about it (privacy).
    ``classifiers``: the result of :func:`query_classifiers` when the strategy has already asked it (GBME)."""
    opts = strategy.opts
    if name == "oracle":
        return oracle_estimate(strategy.cfg), {}
    if name in ("dp_counts", "dp_counts_agm"):
        calibrate = gaussian_sigma if name == "dp_counts" else analytic_gaussian_sigma
        sigma = calibrate(opts.prior_epsilon, opts.prior_delta)
        replies = strategy.query(grid, list(range(strategy.num_clients)), arrays, "noisy-counts", {"sigma": sigma})
        est = dp_counts_estimate([np.asarray(r.content["metrics"]["noisy-counts"]) for r in replies])
        accountant = "opacus RDP, one Gaussian release" if name == "dp_counts" else \
            "analytic Gaussian mechanism (Balle & Wang 2018), one release"
        return est, {"prior_privacy": {"epsilon": opts.prior_epsilon, "delta": opts.prior_delta, "sensitivity": 1.0,
                                       "sigma": sigma, "unit": "one sample of one client (add/remove)",
                                       "accountant": accountant}}
    if name in ("gbme", "dpa"):
        w0, weights, sizes = classifiers or query_classifiers(strategy, grid, arrays)
        return (estimate_prior if name == "gbme" else dpa_estimate)(w0, weights, sizes), {}
    raise ValueError(f"unknown prior estimator {name!r}; known: gbme, dpa, dp_counts, dp_counts_agm, oracle")


def prior_errors(pi: np.ndarray, pi_hat: np.ndarray, few: np.ndarray) -> dict[str, float]:
    """L1, KL(π‖π̂) and the mean relative error |π̂_c − π_c| / π_c over the few-shot classes ``few``."""
    pi = np.asarray(pi, dtype=np.float64) / np.sum(pi)
    pi_hat = np.asarray(pi_hat, dtype=np.float64) / np.sum(pi_hat)
    few = np.asarray(few, dtype=bool)
    rel = np.abs(pi_hat[few] - pi[few]) / pi[few]
    return {**prior_error(pi, pi_hat), "few_rel_err": float(rel.mean()) if few.any() else float("nan")}
