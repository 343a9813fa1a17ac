"""torchvision ResNet-18/50 (``torchvision/models/resnet.py``: 7×7 stride-2 stem, max-pool, four stages) for
ImageNet-scale images, split into features and classifier. On 32×32 images the stem leaves 2×2 maps at layer4's
input (1×1 at its output): CIFAR protocols whose release builds a 3×3-stem ResNet-18 use ``resnet18_cifar``."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from fedlt.models.base import SplitModel, make_classifier
from fedlt.registry import MODELS


def _split(net: tvm.ResNet, num_classes: int, classifier: str, scale: float) -> SplitModel:
    dim = net.fc.in_features
    net.fc = nn.Identity()
    features = nn.Sequential(net, nn.Flatten())
    return SplitModel(features, make_classifier(dim, num_classes, classifier, scale), dim)


def _torchvision_resnet(arch, num_classes: int, in_channels: int, classifier: str, scale: float) -> SplitModel:
    net = arch(weights=None)
    if in_channels != 3:  # a new stem convolution, initialised as torchvision initialises its convolutions
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return _split(net, num_classes, classifier, scale)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, classifier: str = "linear", scale: float = 1.0) -> SplitModel:
    return _torchvision_resnet(tvm.resnet18, num_classes, in_channels, classifier, scale)


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, classifier: str = "linear", scale: float = 1.0) -> SplitModel:
    return _torchvision_resnet(tvm.resnet50, num_classes, in_channels, classifier, scale)
