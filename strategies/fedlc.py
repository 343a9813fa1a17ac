"""FedLC (Zhang et al., ICML 2022): FedAvg on the server; each client calibrates its logits by its own
label counts (clients/fedlc.py). ``strategy.tau`` goes to every client.

Default τ = 1.0, FL-bench's (KarhouTam/FL-bench ``src/server/fedlc.py``, ``--tau`` default 1.0). The paper
defines τ but we found no value for it in the text we could read, and the authors released no code; fedlt
used 0.5 before (docs/results.md's FedLC row says τ = 0.5)."""

from pydantic import Field

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedlc")
class FedLC(FedLTStrategy):
    client = "fedlc"
    client_only = True
    sends = ("tau",)  # client.tau is never read: the server sends strategy.tau

    class Options(FedLTStrategy.Options):
        tau: float = Field(1.0, ge=0, description="calibration strength τ sent to every client (FL-bench's 1.0)")

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return {"fedlc-tau": self.opts.tau}
