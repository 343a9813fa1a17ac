"""FedProx (Li et al., MLSys 2020): FedAvg on the server; the client adds (μ/2)·‖w − w_t‖² (clients/fedprox.py)."""

from pydantic import Field

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedprox")
class FedProx(FedLTStrategy):
    client = "fedprox"
    client_only = True
    sends = ("mu",)  # client.mu is never read: the server sends strategy.mu

    class Options(FedLTStrategy.Options):
        mu: float = Field(0.01, ge=0, description="proximal weight μ sent to every client")

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return {"proximal-mu": self.opts.mu}
