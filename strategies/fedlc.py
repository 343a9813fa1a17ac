"""FedLC (Zhang et al., ICML 2022): FedAvg on the server; each client calibrates its logits by its own
label counts (clients/fedlc.py). ``strategy.tau`` (default 0.5, Flower's baseline) goes to every client."""

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedlc")
class FedLC(FedLTStrategy):
    client = "fedlc"
    options = {"tau": 0.5}

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return {"fedlc-tau": float(self.opts["tau"])}
