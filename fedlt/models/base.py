"""The model contract shared by every method: a feature extractor and a classifier, separately reachable."""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

M = TypeVar("M", bound=nn.Module)


class NormedLinear(nn.Module):
    """Cosine classifier (LDAM-DRW's ``NormedLinear``): z_j = cos(w_j, h), weight stored as (d, C).

    Scale s is applied by the loss (LDAM) or by ``scale`` here (GBME uses s = 30).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5))
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(h, dim=1) @ F.normalize(self.weight, dim=0)


class SplitModel(nn.Module):
    """``forward(x) = classifier(features(x))``; decoupling, CReFF, CCVR and GBME use the two parts alone."""

    def __init__(self, features: nn.Module, classifier: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_classifier(feature_dim: int, num_classes: int, kind: str = "linear", scale: float = 1.0) -> nn.Module:
    if kind == "linear":
        return nn.Linear(feature_dim, num_classes)
    if kind == "cosine":
        return NormedLinear(feature_dim, num_classes, scale)
    raise ValueError(f"unknown classifier kind {kind!r}")


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> SplitModel:
    """Build a registered model by name (``fedlt.registry.MODELS``)."""
    from fedlt.registry import MODELS

    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def kaiming_normal_init(model: M, skip: frozenset[int] = frozenset()) -> M:
    """Kaiming-normal weights (He et al., 2015) for every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` in module
    order, except those whose weight's ``id`` is in ``skip`` (the CIFAR ResNets' ``_weights_init``); in place."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) not in skip:
            nn.init.kaiming_normal_(m.weight)
    return model
