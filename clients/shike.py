"""SHIKE client: SHIKE's stage-1 dynamic knowledge transfer (Jin et al., "Long-Tailed Visual Recognition via
Self-Heterogeneous Integration with Knowledge Excavation", CVPR 2023; jinyan-06/SHIKE ``cifarTrain.py``
``mix_outputs``, see :func:`fedlt.losses.shike.shike_loss`) as the local objective of a depth-fused
multi-expert model (``model.name=*_shike``: :mod:`fedlt.models.shike`), under any strategy:

    L = Σ_i [ CE(z_i, y) + λ·KL̄(q ‖ p̃_i) + Σ_{j≠i} KL̄(softmax z_j ‖ softmax z_i) ],   λ = ``hns_weight``

The DKT loss reads no class counts (the hardest negative and the teacher come from the batch's logits), so the
client's local objective is the centralized stage 1's exactly, on the client's batches.

Not federated: SHIKE's stage 2 (new cosine classifiers re-trained with the balanced softmax on a frozen
backbone, ``centralized.stage2_epochs``) and the official warm-up cosine lr schedule; the clients train at the
server's lr for every round, and the global model is evaluated on the mean of the experts' stage-1 logits.
"""

from __future__ import annotations

from functools import partial

from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.losses.shike import shike_loss
from fedlt.models.shike import DepthFusedOptions
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS, MODELS
from fedlt.train import Objective, TensorData


@CLIENTS.register("shike")
class SHIKEClient(ClientMethod):
    class Options(ClientMethod.Options):
        hns_weight: float = Field(10.0, ge=0, description="weight λ of the hardest-negative suppression KL")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not isinstance(cfg.model, DepthFusedOptions):
            have = ", ".join(sorted(n for n in MODELS if issubclass(MODELS.options(n), DepthFusedOptions)))
            raise FedLTError(f"client method shike needs a depth-fused multi-expert model, got model.name="
                             f"{cfg.model.name!r}: set model.name to one of {have}")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """:func:`~fedlt.losses.shike.shike_loss` of the experts' logits (a
        :class:`~fedlt.objectives.LossObjective`: the fused engine computes a round's in one call)."""
        return LossObjective(partial(shike_loss, hns_weight=self.opts.hns_weight), output="expert_logits")
