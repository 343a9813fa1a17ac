"""Central differential privacy over any strategy: the wrappers' options, the ClientApp's clipping mod and the
privacy spent by Opacus' RDP accountant. The wrappers are strategies/dp_server_fixed.py and
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
q = S/K and noise multiplier σ, by Opacus' Rényi-DP analysis (``opacus.accountants.analysis.rdp``; install
``fedlt[dp]``): ε_RDP(α) of the Poisson-sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), composed
over the T' releases, and turned into (ε, δ) by the conversion of Balle et al. 2020 (Thm. 21), over the
integer orders α = 2..256:

    ε = min_α  T'·ε_RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1),  δ = 1/K by default.

The formula is for Poisson sampling; fedlt draws exactly S clients without replacement, so the figure is
the usual approximation, not a proof. It holds only with uniform client weights (the default here).
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the key Flower's mods read
from pydantic import Field, model_validator

from fedlt.errors import FedLTError
from fedlt.federation.compose import WrapperOptions

ORDERS = tuple(range(2, 257))


class DPOptions(WrapperOptions):
    """The keys of the DP wrappers (``dp_server_fixed``, ``dp_client_fixed``) beside the wrapped strategy's."""

    clipping_norm: float = Field(1.0, gt=0, description="clipping norm C of each client's update")
    noise_multiplier: float = Field(1.0, ge=0, description="noise multiplier σ (noise std σ·C/S on the mean)")
    uniform_weights: bool = Field(True, description="average updates with equal weights (the accountant needs it)")
    delta: float = Field(0.0, ge=0, lt=1, description="δ of the (ε, δ) report (0: 1/number of clients)")

    @model_validator(mode="after")
    def _accountant_installed(self) -> "DPOptions":
        if importlib.util.find_spec("opacus") is None:
            raise FedLTError(f"strategy {self.name!r} reports its privacy with Opacus' RDP accountant, which is "
                             f"not installed: pip install 'fedlt[dp]' (or pip install opacus)")
        return self


def epsilon(q: float, sigma: float, steps: int, delta: float, orders=ORDERS) -> tuple[float, float]:
    """(ε, best order) after ``steps`` compositions of the sampled Gaussian mechanism (Opacus' RDP analysis)."""
    if steps == 0:
        return 0.0, orders[0]
    if sigma <= 0:
        return math.inf, orders[0]
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
    with warnings.catch_warnings():  # α = 2 is often best at fedlt's large q; the order is reported anyway
        warnings.filterwarnings("ignore", "Optimal order is the smallest alpha")
        eps, order = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps), np.asarray(order).item()


def hold_counters(arrays: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """``arrays`` (a client's reply) with each integer array (BatchNorm's ``num_batches_tracked``) set back to
    its value in ``sent`` (w_t), in place. A counter is no weight: in the update w_k − w_t it would add the
    client's step count to ‖Δ‖ (50 steps outweigh any C, so the weights' update was scaled by C/50), and Flower
    leaves a 0-d array unclipped, releasing the count. Held, it is neither clipped nor released."""
    for key, value in arrays.items():
        dtype = value.numpy().dtype
        if np.issubdtype(dtype, np.integer) and key in sent:
            arrays[key] = Array(np.asarray(np.rint(sent[key].numpy())).astype(dtype))
    return arrays


def client_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: Flower's ``fixedclipping_mod`` on train messages whose config names a clipping norm
    (sent by ``dp_client_fixed``): the reply's update w_k − w_t of the model (``arrays``) is scaled by
    min(1, C / ‖w_k − w_t‖₂), its integer counters held at w_t's (:func:`hold_counters`). Other ArrayRecords
    (FedROD's personal head, FedLoGe's local head, which never leave for the aggregate) are set aside around
    Flower's mod, which takes one ArrayRecord only, and are neither clipped nor changed."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        sent_aside = set_aside(msg)
        replied_aside: dict[str, ArrayRecord] = {}

        def call_and_hold(m: Message, ctx: Context) -> Message:
            put_back(m, sent_aside)
            out = call_next(m, ctx)
            if not out.has_error() and MODEL in out.content.array_records:
                replied_aside.update(set_aside(out))
                hold_counters(out.content[MODEL], m.content[MODEL])
            return out

        out = fixedclipping_mod(msg, context, call_and_hold)
        if not out.has_error():
            put_back(out, replied_aside)
        return out
    return call_next(msg, context)


MODEL = "arrays"  # the ArrayRecord of a message that holds the model (FedLTStrategy.arrayrecord_key)


def set_aside(msg: Message, model: str = MODEL) -> dict[str, ArrayRecord]:
    """Take every ArrayRecord but the ``model``'s off ``msg`` (a personal head: Flower's DP clips or accepts one
    ArrayRecord); return them for :func:`put_back`."""
    aside = {k: v for k, v in msg.content.array_records.items() if k != model}
    for k in aside:
        del msg.content[k]
    return aside


def put_back(msg: Message, aside: dict[str, ArrayRecord]) -> None:
    """Give ``msg`` back the records :func:`set_aside` took off."""
    for k, record in aside.items():
        msg.content[k] = record
