"""GLMC client: GLMC's training objective (Du et al., "Global and Local Mixture Consistency Cumulative Learning for
Long-tailed Visual Recognitions", CVPR 2023; ynu-yangpeng/GLMC ``GLMC-2023/Trainer.py``, the formulas in
:mod:`fedlt.losses.glmc`) as the local objective of every client, under any strategy.

Each local step is the step of ``centralized.method=glmc`` (:class:`fedlt.centralized.glmc.GLMC`) with:

- the client's own class counts n_k in place of the training set's: the re-weighted soft labels
  w_c = n_{k,c}^{−k'} / Σ_j n_{k,j}^{−k'} · C (k' = ``label_weighting``; a class absent from the client counts
  as 1, so it gets the largest weight) and the second, re-sampled batch drawn from the client's data alone
  with sample i ∝ n_{k,y_i}^{−q} (q = ``resample_weighting``; absent classes are never drawn);
- the federated round in place of the epoch: round r (``server-round`` of the train config, counted from 1)
  plays the 0-based epoch r − 1 of E = ``federation.rounds``, so the cumulative ramp is
  α = 1 − ((r − 1)/E)² (the official ``1 - (epoch / epochs) ** 2``; the re-balanced head's weight (r − 1)²/E²
  grows with the rounds). Within a round α is fixed, whatever ``train.local_epochs``.

Both views of a batch and of the re-sampled batch are the config's crop/flip (``TwoCropTransform``). The
re-sampled batch comes from the torch generator ``(seed, Stream.CLIENT, round, client, 1)`` and λ, the CutMix
box from the numpy generator ``(seed, Stream.CLIENT, round, client, 2)``, so a client's round is reproducible.

The model: :meth:`GLMCClient.adapt_model` wraps the configured model in :class:`~fedlt.centralized.glmc.GLMCModel`
(the configured classifier is the re-balanced head ``fc_cb``, plus the plain head ``fc``, the projection and
the predictor, all averaged by the strategy); on ``resnet32`` the official ``ResNet_modify`` widths
``client.resnet32_widths`` (64/128/256). The server evaluates ``forward`` = ``fc_cb``, the re-balanced head,
as the centralized method tests it.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.glmc import GLMCModel, TwoCrops
from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.experiment import augment_for
from fedlt.losses.glmc import cumulative_alpha, glmc_label_weights, glmc_loss, glmc_mixed, rand_bbox
from fedlt.models.base import build_model
from fedlt.models.experts import require_single_network
from fedlt.registry import CLIENTS
from fedlt.samplers import class_probabilities, sample_by_class
from fedlt.streams import Stream, seeded_rng, torch_generator
from fedlt.train import Augment, Objective, TensorData, prepare_batch


def glmc_objective(data: TensorData, views: Augment, label_weights: torch.Tensor, resample: torch.Tensor,
                   alpha: float, mix_alpha: float, contrast_weight: float, generator: torch.Generator,
                   rng: np.random.Generator) -> Objective:
    """GLMC's loss of a batch x = [o₁; o₂] (two views of B images, labels y): a re-sampled batch of B images
    (class ∝ ``resample``, two ``views``) from ``generator``, λ ~ Beta(``mix_alpha``, ``mix_alpha``) and the
    CutMix box from ``rng`` (drawn in this order, as :meth:`fedlt.centralized.glmc.GLMC.objective`)."""

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = len(y)
        idx = sample_by_class(data.labels, resample, generator, b)
        xi, yi = prepare_batch(data, idx, views, generator)
        lam = float(rng.beta(mix_alpha, mix_alpha))
        box = rand_bbox(x[b:].shape, lam, rng)
        mix_x, cut_x, t, tw = glmc_mixed(x[:b], x[b:], xi[:b], xi[b:], y, yi, label_weights, lam, box)
        return glmc_loss(model.heads(mix_x), model.heads(cut_x), t, tw, alpha, contrast_weight)
    return objective


@CLIENTS.register("glmc")
class GLMCClient(ClientMethod):
    class Options(ClientMethod.Options):
        mix_alpha: float = Field(1.0, gt=0, description="λ ~ Beta(α, α) of both mixes (official: 1, fixed)")
        resample_weighting: float = Field(0.0, ge=0, description="q: the re-sampled batch draws sample i ∝ n_y^−q "
                                          "(the client's counts)")
        label_weighting: float = Field(1.2, ge=0, description="k: re-weighted targets w_c ∝ n_c^−k (client counts)")
        contrast_weight: float = Field(1.0, ge=0, description="weight w_mc of the mixture-consistency loss")
        projection_dim: int = Field(128, gt=0, description="width of the projection and predictor heads")
        resnet32_widths: list[Annotated[int, Field(gt=0)]] = Field([64, 128, 256], min_length=3, max_length=3,
                                           description="resnet32's stage widths, each > 0 (official GLMC: 64/128/256)")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method glmc adds its heads to a single-head model")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        if cfg.model.name == "resnet32":
            in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
            kw = {**cfg.model.model_dump(exclude={"name"}), "widths": tuple(cfg.client.resnet32_widths)}
            model = build_model("resnet32", num_classes, in_channels, **kw)
        return GLMCModel(model, num_classes, cfg.client.projection_dim)

    def streams(self, config: dict) -> tuple[torch.Generator, np.random.Generator]:
        """(torch generator of the re-sampled batch, numpy generator of λ and the box) of this client's round."""
        key = (int(config.get("server-round", 1)), int(config.get("partition-id", 0)))
        return (torch_generator(self.cfg.seed, Stream.CLIENT, *key, 1),
                seeded_rng(self.cfg.seed, Stream.CLIENT, *key, 2))

    def round_alpha(self, config: dict) -> float:
        """α = 1 − ((r − 1)/E)², round r of E = ``federation.rounds`` as the 0-based epoch r − 1."""
        return cumulative_alpha(int(config.get("server-round", 1)) - 1, self.cfg.federation.rounds)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """GLMC's loss on batches of two views (the batches :meth:`fit` draws: the config's crop/flip, twice)."""
        if not isinstance(model, GLMCModel):
            raise TypeError("the glmc client needs the model its adapt_model builds (GLMCModel)")
        o = self.opts
        counts = data.class_counts
        generator, rng = self.streams(config)
        return glmc_objective(data, TwoCrops(augment_for(self.cfg, data)),
                              glmc_label_weights(counts, o.label_weighting),
                              class_probabilities(counts, 1.0 - o.resample_weighting), self.round_alpha(config),
                              o.mix_alpha, o.contrast_weight, generator, rng)

    def fit(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
            augment: Augment) -> FitResult:
        """Local SGD on :meth:`objective`, each batch drawn as two views of ``augment`` (``TwoCropTransform``)."""
        return super().fit(model, data, config, generator, TwoCrops(augment))
