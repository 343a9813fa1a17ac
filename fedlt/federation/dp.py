"""Central differential privacy over any strategy: the wrappers' options, the ClientApp's clipping mod and a
small RDP accountant for the privacy spent. The wrappers are strategies/dp_server_fixed.py and
strategies/dp_client_fixed.py.

``strategy.name=dp_server_fixed strategy.base=<any> strategy.clipping_norm=C strategy.noise_multiplier=σ``
runs the base strategy with Flower's ``DifferentialPrivacyServerSideFixedClipping`` on every aggregation:
each client's update w_k − w_t is clipped to L2 norm C, the (uniform, ``uniform_weights``) mean is taken
and N(0, (σ·C/S)²) noise is added (Flower's own code; its numpy noise is seeded per release here).
``strategy.name=dp_client_fixed`` is the same mechanism with the clipping done by each client before it
replies (Flower's ``DifferentialPrivacyClientSideFixedClipping`` on the server, Flower's
``fixedclipping_mod`` on the client, applied by :func:`client_clipping_mod` to train messages that carry
a clipping norm), so the server never sees an unclipped update.

What the accountant covers: the model updates of the training rounds. Query rounds that other wrappers
add (GBME's prior estimate, CCVR's feature statistics, CReFF's class gradients) release more and are not
privatised or counted.

Privacy spent: user-level (ε, δ) of T' releases of the sampled Gaussian mechanism with sampling rate
q = S/K and noise multiplier σ, by Rényi DP (Mironov, Talwar, Zhang 2019) over integer orders α:

    A_α = Σ_{k=0..α} C(α, k)·(1 − q)^{α−k}·q^k·exp((k² − k)/(2σ²)),   ε_RDP(α) = log A_α / (α − 1)
    ε = min_α  T'·ε_RDP(α) + log(1/δ)/(α − 1),  δ = 1/K by default.

The formula is for Poisson sampling; fedlt draws exactly S clients without replacement, so the figure is
the usual approximation, not a proof. It holds only with uniform client weights (the default here).
"""

from __future__ import annotations

import math

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the key Flower's mods read
from pydantic import Field

from fedlt.federation.compose import WrapperOptions

ORDERS = tuple(range(2, 257))
STREAM_DP = 7


class DPOptions(WrapperOptions):
    """The keys of the DP wrappers (``dp_server_fixed``, ``dp_client_fixed``) beside the wrapped strategy's."""

    clipping_norm: float = Field(1.0, gt=0, description="clipping norm C of each client's update")
    noise_multiplier: float = Field(1.0, ge=0, description="noise multiplier σ (noise std σ·C/S on the mean)")
    uniform_weights: bool = Field(True, description="average updates with equal weights (the accountant needs it)")
    delta: float = Field(0.0, ge=0, lt=1, description="δ of the (ε, δ) report (0: 1/number of clients)")


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


def client_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: Flower's ``fixedclipping_mod`` on train messages whose config names a clipping norm
    (sent by ``dp_client_fixed``): the reply's update w_k − w_t is scaled by min(1, C / ‖w_k − w_t‖₂)."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
