"""FedLC (Zhang et al., ICML 2022): FedAvg on the server; each client calibrates its logits by its own
label counts (clients/fedlc.py). ``strategy.tau`` (default 0.5, Flower's baseline) goes to every client."""

from pydantic import Field

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedlc")
class FedLC(FedLTStrategy):
    client = "fedlc"

    class Options(FedLTStrategy.Options):
        tau: float = Field(0.5, ge=0, description="calibration strength τ sent to every client")

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return {"fedlc-tau": self.opts.tau}
