"""FedAvgM (Hsu et al., 2019): Δ_t = w_t − FedAvg(w_k), v_t = β·v_{t−1} + Δ_t, w_{t+1} = w_t − η·v_t.

β = 0, η = 1 is FedAvg; CReFF's FedAvgM baseline (Shang et al., IJCAI 2022; shangxinyi/CReFF-FL)
uses β = 0.97. Built on Flower's ``FedAvgM``.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from pydantic import Field

from fedlt.config import Config
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedavgm")
class FedAvgM(FedLTStrategy, FlowerFedAvgM):
    class Options(FedLTStrategy.Options):
        server_lr: float = Field(1.0, gt=0, description="server learning rate η")
        momentum: float = Field(0.9, ge=0, description="server momentum β")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.server_learning_rate = self.opts.server_lr
        self.server_momentum = self.opts.momentum
        self.server_opt = self.server_momentum != 0.0 or self.server_learning_rate != 1.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        if self.current_arrays is None:
            self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "current": None if self.current_arrays is None else
                self.current_arrays.to_numpy_ndarrays(), "keys": None if self.current_arrays is None else
                list(self.current_arrays.keys()), "momentum": self.momentum_vector}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("current") is not None:
            self.current_arrays = ArrayRecord({k: Array(v) for k, v in zip(state["keys"], state["current"])})
        self.momentum_vector = state.get("momentum")
