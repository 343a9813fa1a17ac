"""CIFAR ResNets (He et al., 2016, §4.2) with option-A shortcuts, as in LDAM-DRW's ``resnet32``.

ResNet-6n+2: a 3×3 stem with 16 channels, three stages of n basic blocks (16, 32, 64 channels).
ResNet-32 (n = 5) has about 0.46M parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fedlt.models.base import SplitModel, make_classifier
from fedlt.registry import MODELS


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        # option A: subsample, zero-pad the new channels (no parameters)
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3, widths=(16, 32, 64),
                 classifier: str = "linear", scale: float = 1.0) -> SplitModel:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    features = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        make_stage(widths[0], widths[0], n, 1),
        make_stage(widths[0], widths[1], n, 2),
        make_stage(widths[1], widths[2], n, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    model = SplitModel(features, make_classifier(widths[2], num_classes, classifier, scale), widths[2])
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_channels: int = 3, **kw) -> SplitModel:
    return cifar_resnet(32, num_classes, in_channels, **kw)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, **kw) -> SplitModel:
    return cifar_resnet(20, num_classes, in_channels, **kw)


@MODELS.register("resnet8")
def resnet8(num_classes: int, in_channels: int = 3, **kw) -> SplitModel:
    """ResNet-8 (one block per stage), the CReFF / BalanceFL client model family."""
    return cifar_resnet(8, num_classes, in_channels, **kw)
