"""FedLoGe (Xiao et al., ICLR 2024; official code ZackZikaiXiao/FedLoGe, ``fedloge.py``): FedAvg (weights
n_k / Σ n_j, ``util/fedavg.py`` ``FedAvg_noniid`` and ``FedAvg_noniid_classifier``) over the backbone and
the auxiliary global head g_aux; SSE-C stays fixed (clients/fedloge.py). The server keeps each client's
local head l_k (the official ``l_heads``, never aggregated), sends it with the client's train (and query)
messages and stores the one the client returns.

Global model (``strategy.global_head``): ``gha`` (default) — the backbone with g_aux realigned,
w_c ← 1.7·w_c/‖w_c‖ (``globaltest_calibra``; the readme's step 2.2); ``sse_c`` — the backbone with the fixed
SSE-C (``fedloge.py``'s per-round ``globaltest`` with ``global_test_head = 'g_head'``); ``aux`` — g_aux as
trained; summary.json's ``fedloge_heads`` holds the final metrics of all three. Official protocol (CIFAR-10-LT): configs/federated/fedloge_cifar10_lt.yaml.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from pydantic import Field
from torch import nn

from clients.fedloge import FedLoGeHead, HeadModel, gha_weight
from fedlt.config import Config
from fedlt.federation.compose import global_model_metrics
from fedlt.federation.strategy import FedLTStrategy
from fedlt.models.experts import require_single_network
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedloge")
class FedLoGe(FedLTStrategy):
    client = "fedloge"

    class Options(FedLTStrategy.Options):
        global_head: Literal["gha", "sse_c", "aux"] = Field(
            "gha", description="the global model's head: gha (realigned g_aux), sse_c (fixed sparse ETF), aux")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "strategy fedloge realigns the one classifier")

    def __init__(self, cfg, num_classes: int, **kw) -> None:
        super().__init__(cfg, num_classes, **kw)
        self.local_heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # partition id -> (W_l, b_l)

    def train_config(self, server_round: int, partition_id: int) -> dict:
        if partition_id not in self.local_heads:
            return {}
        w, b = self.local_heads[partition_id]
        return {"l-head-weight": w.flatten().tolist(), "l-head-bias": b.tolist()}

    def aggregate_checked(self, server_round: int, replies: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for r in replies:
            if "l-head" in r.content:
                pid = int(r.content["metrics"]["partition-id"])
                heads = r.content["l-head"].to_torch_state_dict()
                self.local_heads[pid] = (heads["weight"].float(), heads["bias"].float())
                del r.content["l-head"]  # Flower's FedAvg aggregates a reply's one ArrayRecord
        return super().aggregate_checked(server_round, replies)

    def eval_model(self, model: nn.Module, global_head: str | None = None) -> nn.Module:
        head, which = model.classifier, global_head or self.opts.global_head
        if not isinstance(head, FedLoGeHead) or which == "sse_c":
            return model
        if which == "aux":
            return HeadModel(model.features, head.aux)
        weight = gha_weight(head.aux.weight.detach())
        bias = head.aux.bias.detach()
        return HeadModel(model.features, lambda h: F.linear(h, weight.to(h.device), bias.to(h.device)))

    def summary_extras(self) -> dict:
        """summary.json's ``fedloge_heads``: the final global model's test metrics with each global head."""
        out = super().summary_extras()
        if self.global_arrays is not None:
            out["fedloge_heads"] = {which: global_model_metrics(self, lambda m, w=which: self.eval_model(m, w),
                                                                self.transform_logits)
                                    for which in ("gha", "sse_c", "aux")}
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "local_heads": {str(k): [w, b] for k, (w, b) in self.local_heads.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.local_heads = {int(k): (w, b) for k, (w, b) in state.get("local_heads", {}).items()}
