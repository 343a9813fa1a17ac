"""Central DP with server-side fixed clipping over any strategy (Flower's
``DifferentialPrivacyServerSideFixedClipping``; fedlt/federation/dp.py has Opacus' accountant):
``strategy.name=dp_server_fixed strategy.base=fedavg strategy.clipping_norm=1 strategy.noise_multiplier=1``.
Every aggregation of the base (each of GBME's sub-rounds too) clips each reply's update w_k − w_t to norm C,
takes the mean (uniform weights by default) and adds N(0, (σ·C/S)²). Integer arrays (BatchNorm's step
counters) are held at w_t's in every reply first (fedlt/federation/dp.py ``hold_counters``). summary.json gets
``privacy``: (ε, δ = 1/K unless ``delta`` > 0) from the RDP accountant."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedlt.config import Config
from fedlt.federation.compose import StrategyWrapper
from fedlt.federation.dp import DPOptions, epsilon, hold_counters, put_back, set_aside
from fedlt.registry import STRATEGIES
from fedlt.streams import Stream, seeded_rng


class _Inner:
    """What Flower's DP wrapper sees as the wrapped strategy: the base's aggregation of checked replies, given
    back the client records (e.g. FedROD's personal head) that were taken off the replies so that Flower clips
    the model's ArrayRecord alone (it clips every ArrayRecord of a reply against w_t's arrays)."""

    def __init__(self, aggregate, held: list[dict[str, ArrayRecord]]) -> None:
        self.aggregate, self.held = aggregate, held

    def aggregate_train(self, server_round: int, replies: list[Message]):
        for reply, records in zip(replies, self.held, strict=True):
            put_back(reply, records)
        return self.aggregate(server_round, replies)


@STRATEGIES.register("dp_server_fixed")
class DPServerFixed(StrategyWrapper):
    """Server-side clipping: Flower's wrapper clips each reply's update, averages and adds the noise."""

    Options = DPOptions
    flower_wrapper = DifferentialPrivacyServerSideFixedClipping
    clipping = "server"

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.releases = 0  # noisy aggregates released so far
        self.current: ArrayRecord | None = None  # the weights the latest train messages carried (w_t)
        self.sampled = 1  # how many clients the latest train messages went to (S)

    def messages(self, pids: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str,
                 server_round: int) -> list[Message]:
        if message_type == MessageType.TRAIN:
            self.current, self.sampled = arrays, len(pids)
        return self.base.messages(pids, arrays, config, message_type, server_round)

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        held = []
        for r in replies:
            if self.opts.uniform_weights:
                r.content["metrics"][self.weighted_by_key] = 1
            if self.current is not None:  # step counters are no part of the clipped update
                hold_counters(r.content[self.arrayrecord_key], self.current)
            held.append(set_aside(r, self.arrayrecord_key))
        dp = self.flower_wrapper(_Inner(self.base.aggregate_checked, held), self.opts.noise_multiplier,
                                 self.opts.clipping_norm, self.sampled)
        dp.current_arrays = self.current
        state = np.random.get_state()  # Flower draws its noise from numpy's global generator: seed each release
        np.random.seed(seeded_rng(self.cfg.seed, Stream.DP, server_round, self.releases).integers(2**32))
        try:
            out = dp.aggregate_train(server_round, replies)
        finally:
            np.random.set_state(state)
        if out[0] is not None:
            self.releases += 1
        return out

    def privacy_spent(self) -> dict:
        q = self.sampled / self.num_clients
        delta = self.opts.delta or 1.0 / self.num_clients
        eps, order = epsilon(q, self.opts.noise_multiplier, self.releases, delta)
        return {"epsilon": eps, "delta": delta, "rdp_order": order, "releases": self.releases, "sampling_rate": q,
                "noise_multiplier": self.opts.noise_multiplier, "clipping_norm": self.opts.clipping_norm,
                "clipping": self.clipping, "covers": "model updates of the training rounds (not query rounds)",
                "accountant": "opacus.accountants.analysis.rdp: RDP of the Poisson-sampled Gaussian mechanism, "
                              "integer orders 2..256"}

    def summary_extras(self) -> dict:
        return {**self.base.summary_extras(), "privacy": self.privacy_spent()}

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), "dp_releases": self.releases, "dp_sampled": self.sampled}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
        self.releases, self.sampled = state.get("dp_releases", 0), state.get("dp_sampled", 1)
