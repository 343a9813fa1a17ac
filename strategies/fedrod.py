"""FedROD (Chen & Chao, ICLR 2022): FedAvg of the body and the generic head (trained with the Balanced
Softmax loss, clients/fedrod.py); each client's personal head stays out of the aggregation.

The server keeps every client's personal head between its rounds (``self.personal``, partition id -> state
dict, saved in the checkpoint), sends client k its own head in k's messages (``client_records``, train and
``local-eval`` alike) and stores the head k sends back; the record is taken off the replies before Flower's
FedAvg aggregates their weights. Every personal head starts as the initial generic head (PFLlib's
``clientrod.py`` copies the initial predictor, TsingZ0/PFLlib). A deployment would keep the head on the
client; the server-side copy is fedlt's way of keeping client state across rounds and resumes.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from clients.fedrod import PERSONAL
from fedlt.config import Config
from fedlt.federation.records import to_arrays, to_state
from fedlt.federation.strategy import FedLTStrategy
from fedlt.models.experts import require_single_network
from fedlt.registry import STRATEGIES


def classifier_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier's own entries of a model state dict (``classifier.weight`` -> ``weight``)."""
    return {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("classifier.")}


@STRATEGIES.register("fedrod")
class FedROD(FedLTStrategy):
    client = "fedrod"
    client_only = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "strategy fedrod keeps a personal copy of the one classifier")

    def __init__(self, cfg, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.personal: dict[int, dict[str, torch.Tensor]] = {}

    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        head = classifier_state(to_state(arrays))
        self.personal = {pid: {k: v.clone() for k, v in head.items()} for pid in range(self.num_clients)}
        return arrays

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        head = self.personal.get(partition_id)
        return {} if head is None else {PERSONAL: to_arrays(head)}

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for msg in replies:
            pid = int(next(iter(msg.content.metric_records.values()))["partition-id"])
            if PERSONAL in msg.content:
                self.personal[pid] = to_state(msg.content[PERSONAL])
                del msg.content[PERSONAL]
        return super().aggregate_checked(server_round, replies)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "personal": {int(k): v for k, v in self.personal.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.personal = {int(k): v for k, v in state.get("personal", {}).items()}
