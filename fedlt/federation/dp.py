"""Central differential privacy over any strategy, and a small RDP accountant for the privacy spent.

``strategy.name=dp_server_fixed strategy.base=<any> strategy.clipping_norm=C strategy.noise_multiplier=σ``
runs the base strategy with Flower's ``DifferentialPrivacyServerSideFixedClipping`` on every aggregation:
each client's update w_k − w_t is clipped to L2 norm C, the (uniform, ``uniform_weights``) mean is taken
and N(0, (σ·C/S)²) noise is added (Flower's own code; its numpy noise is seeded per release here).

Privacy spent: user-level (ε, δ) of T' releases of the sampled Gaussian mechanism with sampling rate
q = S/K and noise multiplier σ, by Rényi DP (Mironov, Talwar, Zhang 2019) over integer orders α:

    A_α = Σ_{k=0..α} C(α, k)·(1 − q)^{α−k}·q^k·exp((k² − k)/(2σ²)),   ε_RDP(α) = log A_α / (α − 1)
    ε = min_α  T'·ε_RDP(α) + log(1/δ)/(α − 1),  δ = 1/K by default.

The formula is for Poisson sampling; fedlt draws exactly S clients without replacement, so the figure is
the usual approximation, not a proof. It holds only with uniform client weights (the default here).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedlt.experiment import seeded_rng

ORDERS = tuple(range(2, 257))
STREAM_DP = 7


def sgm_rdp(q: float, sigma: float, alpha: int) -> float:
    """ε_RDP(α) of one sampled Gaussian mechanism (integer α ≥ 2), computed in log space."""
    if q == 0:
        return 0.0
    if q == 1:
        return alpha / (2 * sigma**2)
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1) + (alpha - k) * math.log1p(-q)
             + k * math.log(q) + (k * k - k) / (2 * sigma**2) for k in range(alpha + 1)]
    m = max(terms)
    return (m + math.log(sum(math.exp(t - m) for t in terms))) / (alpha - 1)


def epsilon(q: float, sigma: float, steps: int, delta: float, orders=ORDERS) -> tuple[float, int]:
    """(ε, best order) after ``steps`` compositions of the sampled Gaussian mechanism."""
    if steps == 0:
        return 0.0, orders[0]
    if sigma <= 0:
        return math.inf, orders[0]
    return min((steps * sgm_rdp(q, sigma, a) + math.log(1 / delta) / (a - 1), a) for a in orders)


class _Inner:
    """What Flower's DP wrapper sees as the wrapped strategy: the base's own aggregate_train."""

    def __init__(self, aggregate) -> None:
        self.aggregate_train = aggregate


class DPFixedMixin:
    def wrap_init(self, opts: dict) -> None:
        self.dp_opts = opts
        self.dp_releases = 0
        self.dp_current: ArrayRecord | None = None
        self.dp_sampled = 1

    def messages(self, pids, arrays, config, message_type, server_round) -> list[Message]:
        if message_type == MessageType.TRAIN:
            self.dp_current, self.dp_sampled = arrays, len(pids)
        return super().messages(pids, arrays, config, message_type, server_round)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.check_replies(replies)
        if self.dp_opts["uniform_weights"]:
            for r in replies:
                r.content["metrics"][self.weighted_by_key] = 1
        base = super().aggregate_train
        dp = DifferentialPrivacyServerSideFixedClipping(_Inner(base), float(self.dp_opts["noise_multiplier"]),
                                                        float(self.dp_opts["clipping_norm"]), self.dp_sampled)
        dp.current_arrays = self.dp_current
        state = np.random.get_state()
        np.random.seed(seeded_rng(self.cfg["seed"], STREAM_DP, server_round, self.dp_releases).integers(2**32))
        try:
            out = dp.aggregate_train(server_round, replies)
        finally:
            np.random.set_state(state)
        if out[0] is not None:
            self.dp_releases += 1
        return out

    def privacy_spent(self) -> dict:
        q = self.dp_sampled / self.num_clients
        delta = float(self.dp_opts["delta"]) or 1.0 / self.num_clients
        eps, order = epsilon(q, float(self.dp_opts["noise_multiplier"]), self.dp_releases, delta)
        return {"epsilon": eps, "delta": delta, "rdp_order": order, "releases": self.dp_releases, "sampling_rate": q,
                "noise_multiplier": float(self.dp_opts["noise_multiplier"]),
                "clipping_norm": float(self.dp_opts["clipping_norm"]),
                "accountant": "RDP of the Poisson-sampled Gaussian mechanism, integer orders 2..256"}

    def summary_extras(self) -> dict:
        return {**super().summary_extras(), "privacy": self.privacy_spent()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "dp_releases": self.dp_releases, "dp_sampled": self.dp_sampled}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.dp_releases, self.dp_sampled = state.get("dp_releases", 0), state.get("dp_sampled", 1)
