"""GLMC (Du et al., "Global and Local Mixture Consistency Cumulative Learning for Long-tailed Visual
Recognitions", CVPR 2023; follows ynu-yangpeng/GLMC ``GLMC-2023/Trainer.py``, ``main.py``,
``model/ResNet_cifar.py``): the formulas are in :mod:`fedlt.losses.glmc`.

Each step trains on the batch of the run's sampler (two crop/flip views of each image, ``TwoCropTransform``)
and on a second batch of as many images drawn with replacement with per-sample weight n_y^{−q}
(q = ``resample_weighting``; the official ``WeightedRandomSampler``), also two views, from the method's own
random stream. The model (:class:`GLMCModel`) adds to the configured one a second linear head and the
projection/predictor of the mixture-consistency loss; its ``forward`` (test) is the re-balanced head ``fc_cb``.
Not copied: the official ``main.py`` reports the best test accuracy over the epochs; fedlt reports the last.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.config import Config
from fedlt.experiment import Experiment, model_for
from fedlt.losses.glmc import cumulative_alpha, glmc_label_weights, glmc_loss, glmc_mixed, rand_bbox
from fedlt.models.experts import require_single_network
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED
from fedlt.samplers import class_probabilities, sample_by_class
from fedlt.streams import Stream, seeded_rng, torch_generator
from fedlt.train import Augment, Objective, TensorData, prepare_batch


class GLMCModel(nn.Module):
    """features → h; ``forward`` = fc_cb(h) (the configured classifier); :meth:`heads` = (fc(h), fc_cb(h), z, p)
    with z = P(h) (Linear d → ``hidden``), p = Q(z) (Linear ``hidden`` → ``hidden``), as ``ResNet_modify``.
    The added linears are Kaiming-normal initialised (the official ``_weights_init``)."""

    def __init__(self, base: nn.Module, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        d = base.feature_dim
        self.features, self.classifier, self.feature_dim = base.features, base.classifier, d
        self.fc = nn.Linear(d, num_classes)
        self.projection_head = nn.Linear(d, hidden)
        self.contrast_head = nn.Linear(hidden, hidden)
        for layer in (self.fc, self.projection_head, self.contrast_head):
            nn.init.kaiming_normal_(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x)
        z = self.projection_head(h)
        return self.fc(h), self.classifier(h), z, self.contrast_head(z)


class TwoCrops:
    """[view₁; view₂]: two independent draws of ``view`` of the same images (2B rows)."""

    def __init__(self, view: Augment) -> None:
        self.view = view

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.cat([self.view(x, generator), self.view(x, generator)])


@CENTRALIZED.register("glmc")
class GLMC(CentralizedMethod):
    """GLMC: mixup/CutMix mixture consistency with a re-sampled batch, cumulative head/tail re-weighted soft
    labels (:mod:`fedlt.losses.glmc`). Defaults: the official CIFAR-10-LT IF 100 command (``--beta 0.5``
    unused, ``--resample_weighting 0.0 --label_weighting 1.2 --contrast_weight 1``); on ``resnet32`` the
    official ``ResNet_modify`` widths 64/128/256 (``nf=64``)."""

    class Options(CentralizedOptions):
        mix_alpha: float = Field(1.0, gt=0, description="λ ~ Beta(α, α) of both mixes (official: 1, fixed)")
        resample_weighting: float = Field(0.0, ge=0, description="q: the second batch draws sample i ∝ n_y^−q")
        label_weighting: float = Field(1.2, ge=0, description="k: re-weighted targets w_c ∝ n_c^−k")
        contrast_weight: float = Field(1.0, ge=0, description="weight w_mc of the mixture-consistency loss")
        projection_dim: int = Field(128, gt=0, description="width of the projection and predictor heads")
        resnet32_widths: list[Annotated[int, Field(gt=0)]] = Field([64, 128, 256], min_length=3, max_length=3,
                                           description="resnet32's stage widths, each > 0 (official GLMC: 64/128/256)")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require_single_network(cfg, "centralized.method=glmc adds its heads to a single-head model")

    def __init__(self, cfg, train_counts) -> None:
        super().__init__(cfg, train_counts)
        self.weights = glmc_label_weights(self.class_counts, self.opts.label_weighting)
        self.resample = class_probabilities(self.class_counts, 1.0 - self.opts.resample_weighting)
        self.generator = torch_generator(cfg.seed, Stream.CENTRAL, Stream.METHOD)
        self.data: TensorData | None = None
        self.views: Augment | None = None

    def build_model(self, exp: Experiment) -> nn.Module:
        extra = {"widths": tuple(self.opts.resnet32_widths)} if self.cfg.model.name == "resnet32" else {}
        base = model_for(self.cfg, exp, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeded_rng(self.cfg.seed, Stream.INIT, Stream.METHOD).integers(2**31)))
            return GLMCModel(base, exp.num_classes, self.opts.projection_dim)

    def augment(self, data: TensorData) -> Augment:
        self.data, self.views = data, TwoCrops(super().augment(data))
        return self.views

    def resampled_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views (2·size rows) of ``size`` images drawn with replacement, sample i ∝ n_{y_i}^{−q}."""
        idx = sample_by_class(self.data.labels, self.resample, self.generator, size)
        return prepare_batch(self.data, idx, self.views, self.generator)

    def objective(self, epoch: int) -> Objective:
        alpha, o = cumulative_alpha(epoch, self.epochs), self.opts

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            b = len(y)
            xi, yi = self.resampled_batch(b)
            lam = float(self.rng.beta(o.mix_alpha, o.mix_alpha))
            box = rand_bbox(x[b:].shape, lam, self.rng)
            mix_x, cut_x, t, tw = glmc_mixed(x[:b], x[b:], xi[:b], xi[b:], y, yi, self.weights, lam, box)
            return glmc_loss(model.heads(mix_x), model.heads(cut_x), t, tw, alpha, o.contrast_weight)
        return objective

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
