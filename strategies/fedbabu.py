"""FedBABU (Oh et al., ICLR 2022): FedAvg of the body; the head keeps its initial (random) weights throughout
federated training (clients/fedbabu.py freezes it) and is fine-tuned per client only for the personalised
model. The aggregated head is replaced by the previous global head, so the weighted mean of identical heads
cannot drift by rounding (the official ``--aggr_part body``, jhoon-oh/FedBABU ``main_fed.py``, averages the
body's keys only).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord

from fedlt.config import Config
from fedlt.federation.records import to_arrays, to_state
from fedlt.federation.strategy import FedLTStrategy
from fedlt.models.experts import require_single_network
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedbabu")
class FedBABU(FedLTStrategy):
    client = "fedbabu"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "strategy fedbabu keeps the one classifier at its initial weights")

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_checked(server_round, replies)
        if arrays is None or self.global_arrays is None:
            return arrays, metrics
        state, before = to_state(arrays), to_state(self.global_arrays)
        state.update({k: before[k] for k in state if k.startswith("classifier.")})
        return to_arrays(state), metrics
