"""FedProx (Li et al., MLSys 2020): FedAvg on the server; the client adds (μ/2)·‖w − w_t‖² (clients/fedprox.py)."""

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedprox")
class FedProx(FedLTStrategy):
    client = "fedprox"
    options = {"mu": 0.01}

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return {"proximal-mu": float(self.opts["mu"])}
