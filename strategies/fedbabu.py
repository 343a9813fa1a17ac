"""FedBABU (Oh et al., ICLR 2022): FedAvg of the body; the head keeps its initial (random) weights throughout
federated training (clients/fedbabu.py freezes it) and is fine-tuned per client only for the personalised
model. The aggregated head is replaced by the previous global head, so the mean of identical heads cannot
drift by rounding (the official ``--aggr_part body``, jhoon-oh/FedBABU ``main_fed.py``, averages the body's
keys only).

The official mean is the plain mean over the round's clients (``w_glob[k] / m``; its shard partitions give
every client the same size), ``strategy.weighting=uniform``; ``examples`` weights each client by its number
of training examples, as FedAvg and FedLoGe's re-implementation (``util/fedavg.py``) do. The official lr
decays ×0.1 after rounds T/2 and 3T/4 (``federation.lr_schedule=step`` with those milestones); the shipped
config follows FedLoGe's protocol instead (constant lr, weighted by examples).
"""

from __future__ import annotations

from typing import Literal

from flwr.app import ArrayRecord, Message, MetricRecord
from pydantic import Field

from fedlt.config import Config
from fedlt.federation.records import to_arrays, to_state
from fedlt.federation.strategy import FedLTStrategy
from fedlt.models.experts import require_single_network
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedbabu")
class FedBABU(FedLTStrategy):
    class Options(FedLTStrategy.Options):
        weighting: Literal["uniform", "examples"] = Field(
            "uniform", description="mean of the clients' bodies: plain (the official main_fed.py) or weighted by "
                                   "their training examples (FedAvg's, FedLoGe's)")

    client = "fedbabu"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "strategy fedbabu keeps the one classifier at its initial weights")

    def mean_weighted_by(self) -> str | None:
        return None if self.opts.weighting == "uniform" else self.weighted_by_key

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_checked(server_round, replies)
        if arrays is None or self.global_arrays is None:
            return arrays, metrics
        state, before = to_state(arrays), to_state(self.global_arrays)
        state.update({k: before[k] for k in state if k.startswith("classifier.")})
        return to_arrays(state), metrics
