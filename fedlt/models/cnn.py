"""A small CNN for 28×28 grayscale images (Fashion-MNIST): two conv blocks and a 128-d feature layer. fedlt's own
model for CPU budgets (no paper's official file); other image sizes work down to 4×4 (the adaptive pooling to 4×4
copies or averages), smaller ones are refused before training (:func:`fedlt.experiment.check_input_size`)."""

from __future__ import annotations

from torch import nn

from fedlt.models.base import SplitModel, make_classifier
from fedlt.registry import MODELS


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (batch, group or none)")


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, width: int = 32, norm: str = "group",
              classifier: str = "linear", scale: float = 1.0) -> SplitModel:
    """conv(w)-norm-ReLU-pool, conv(2w)-norm-ReLU-pool, FC(128)-ReLU; 151K parameters at w=32 and 10 classes
    (GroupNorm of min(8, channels) groups).

    GroupNorm by default: BatchNorm's running statistics, averaged over non-IID clients, do not match
    the averaged weights, and FedAvg's global model then swings between rounds (Hsieh et al., 2020).
    """
    features = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"), _norm(norm, width), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=norm == "none"), _norm(norm, 2 * width),
        nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True),
    )
    return SplitModel(features, make_classifier(128, num_classes, classifier, scale), 128)
