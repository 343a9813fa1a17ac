"""FedAvgM (Hsu et al., 2019): Δ_t = w_t − FedAvg(w_k), v_t = β·v_{t−1} + Δ_t, w_{t+1} = w_t − η·v_t.

β = 0, η = 1 is FedAvg; CReFF's FedAvgM baseline (Shang et al., IJCAI 2022; shangxinyi/CReFF-FL)
uses β = 0.97. Built on Flower's ``FedAvgM``, with one departure: BatchNorm's statistics (``running_mean``,
``running_var``, ``num_batches_tracked``) take the plain weighted mean FedAvg(w_k), not the momentum step.
Flower steps every array; a statistic is no parameter, and the step extrapolates it: running_var falling
from 1 to 0.05 in one round becomes 0.05 − 0.9·0.95 = −0.805 the next, and evaluation NaN.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from pydantic import Field

from fedlt.config import Config
from fedlt.federation.records import keep_dtypes
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's buffers: no momentum step


@STRATEGIES.register("fedavgm")
class FedAvgM(FedLTStrategy, FlowerFedAvgM):
    class Options(FedLTStrategy.Options):
        server_lr: float = Field(1.0, gt=0, description="server learning rate η")
        momentum: float = Field(0.9, ge=0, lt=1, description="server momentum β, in [0, 1)")

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

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvgM step on the parameters; each BatchNorm statistic set to the weighted mean of the
        replies' (its momentum held at 0), in the aggregate and in w_t alike."""
        arrays, metrics = super().aggregate_checked(server_round, replies)
        if arrays is None or not self.server_opt:
            return arrays, metrics
        keys = list(arrays.keys())
        weights = np.asarray([float(r.content["metrics"][self.weighted_by_key]) for r in replies])
        for i, key in enumerate(keys):
            if key.rsplit(".", 1)[-1] not in STATISTICS:
                continue
            values = np.stack([r.content[self.arrayrecord_key][key].numpy().astype(np.float64) for r in replies])
            arrays[key] = Array(np.tensordot(weights / weights.sum(), values, axes=1))
            if self.momentum_vector is not None:
                self.momentum_vector[i] = np.zeros_like(self.momentum_vector[i])
        keep_dtypes(arrays, replies[0].content[self.arrayrecord_key])  # in place: arrays is Flower's new w_t too
        return arrays, metrics

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
