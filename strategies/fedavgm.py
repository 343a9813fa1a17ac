"""FedAvgM (Hsu et al., 2019): Δ_t = w_t − FedAvg(w_k), v_t = β·v_{t−1} + Δ_t, w_{t+1} = w_t − η·v_t.

β = 0, η = 1 is FedAvg; CReFF's FedAvgM baseline (Shang et al., IJCAI 2022; shangxinyi/CReFF-FL)
uses β = 0.97. Built on Flower's ``FedAvgM``.
"""

from __future__ import annotations

import numpy as np
import torch
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
        """The server's weights w_t and momentum v_t as tensors (Flower keeps numpy arrays; a checkpoint holds
        tensors, read back with ``weights_only=True``)."""
        current = None if self.current_arrays is None else self.current_arrays.to_numpy_ndarrays()
        return {**super().state_dict(), "current": _tensors(current),
                "keys": None if self.current_arrays is None else list(self.current_arrays.keys()),
                "momentum": _tensors(self.momentum_vector)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("current") is not None:
            self.current_arrays = ArrayRecord({k: Array(v) for k, v in zip(state["keys"], _arrays(state["current"]))})
        self.momentum_vector = _arrays(state.get("momentum"))


def _tensors(arrays: list[np.ndarray] | None) -> list[torch.Tensor] | None:
    return None if arrays is None else [torch.from_numpy(np.array(a)) for a in arrays]


def _arrays(tensors: list | None) -> list[np.ndarray] | None:
    return None if tensors is None else [t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in tensors]
