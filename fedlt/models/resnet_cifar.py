"""CIFAR ResNets (He et al., 2016, §4.2) with option-A shortcuts, as in LDAM-DRW's ``resnet32``
(kaidic/LDAM-DRW ``models/resnet_cifar.py``, ``ResNet_s``: kaiming-normal Conv2d and Linear weights,
``NormedLinear`` for ``use_norm``).

ResNet-6n+2: a 3×3 stem with 16 channels, three stages of n basic blocks (16, 32, 64 channels).
ResNet-32 (n = 5) has 464,154 parameters at 10 classes (0.46M), ResNet-20 269,722.

``resnet8_x4`` is CReFF's model (shangxinyi/CReFF-FL ``Model/Resnet8.py``, ``ResNet_cifar(resnet_size=8,
scaling=4)``): one basic block per stage at 4× width (64, 128, 256 channels, 256-d features), option-B
shortcuts (1×1 conv + BN where the shape changes), convolutions drawn N(0, 2/(k²·out)) and PyTorch's default
Linear initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.models.base import SplitModel, kaiming_normal_init, make_classifier
from fedlt.registry import MODELS


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut: option A (subsample, zero-pad the new channels; no
    parameters) or option B (1×1 conv + BN, as CReFF's ``ResNet_cifar``) where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride
        self.downsample = None
        if shortcut == "B" and (stride != 1 or in_planes != planes):
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def shortcut(self, x):
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride == 1 and self.pad == 0:
            return x
        # option A: subsample, zero-pad the new channels (no parameters)
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str = "A") -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride, shortcut)] + [BasicBlock(planes, planes, 1, shortcut)
                                                                   for _ in range(blocks - 1)]
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
    return kaiming_normal_init(model)


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_channels: int = 3, **kw) -> SplitModel:
    return cifar_resnet(32, num_classes, in_channels, **kw)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, **kw) -> SplitModel:
    return cifar_resnet(20, num_classes, in_channels, **kw)


@MODELS.register("resnet8_x4")
def resnet8_x4(num_classes: int, in_channels: int = 3, classifier: str = "linear", scale: float = 1.0) -> SplitModel:
    """CReFF's ResNet-8 ×4 (``ResNet_cifar(resnet_size=8, scaling=4)``): 64/128/256 channels, option-B
    shortcuts, 256-d features, conv weights N(0, 2/(k²·out)) (kaiming, fan-out), default Linear init."""
    widths = (64, 128, 256)
    features = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        make_stage(widths[0], widths[0], 1, 1, "B"),
        make_stage(widths[0], widths[1], 1, 2, "B"),
        make_stage(widths[1], widths[2], 1, 2, "B"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # AvgPool2d(8) on the 8×8 maps of a 32×32 input
    )
    model = SplitModel(features, make_classifier(widths[2], num_classes, classifier, scale), widths[2])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


class TwoBranches(nn.Module):
    """BBN's last stage: two parallel basic blocks (``cb_block`` and ``rb_block``, ``planes`` channels each) on the
    same input, their outputs concatenated along the channels (2·``planes``)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.cb_block = BasicBlock(planes, planes)
        self.rb_block = BasicBlock(planes, planes)

    def forward(self, x):
        return torch.cat([self.cb_block(x), self.rb_block(x)], dim=1)


@MODELS.register("resnet32_bbn")
def resnet32_bbn(num_classes: int, in_channels: int = 3, classifier: str = "linear",
                 scale: float = 1.0) -> SplitModel:
    """BBN's ResNet-32 (Zhou et al., CVPR 2020; ``BBN_ResNet_Cifar(BasicBlock, [5, 5, 5])``), the backbone of
    TDE's CIFAR runs (KaihuaTang/Long-Tailed-Recognition.pytorch ``classification/models/ResNet32Feature.py``):
    the stem and stages of ResNet-32 with 5, 5 and 4 blocks (16, 32, 64 channels, option A), then
    :class:`TwoBranches` of 64 channels concatenated: 128-d features (``feat_dim: 128`` in TDE's
    ``causal_norm_32.yaml``). Kaiming-normal Conv2d and Linear weights (``_weights_init``). 538,778 parameters
    at 10 classes with a linear head."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        make_stage(16, 16, 5, 1), make_stage(16, 32, 5, 2), make_stage(32, 64, 4, 2), TwoBranches(64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return kaiming_normal_init(SplitModel(features, make_classifier(128, num_classes, classifier, scale), 128))


@MODELS.register("resnet8")
def resnet8(num_classes: int, in_channels: int = 3, **kw) -> SplitModel:
    """LDAM-DRW's ``ResNet_s`` with one block per stage (16/32/64 channels, option A; 75K parameters): fedlt's
    CPU-budget CIFAR model. Not CReFF's ResNet-8 (``resnet8_x4``) nor BalanceFL's ``ResNet8`` (its
    ``BBN_ResNet_Cifar`` with two parallel last blocks)."""
    return cifar_resnet(8, num_classes, in_channels, **kw)


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_channels: int = 3, classifier: str = "linear",
                   scale: float = 1.0) -> SplitModel:
    """ResNet-18 for 32×32 images (the kuangliu/pytorch-cifar layout that FedLoGe and Fed-GraB use,
    ZackZikaiXiao/FedLoGe ``model/model_res.py``): a 3×3 stem with 64 channels, no max-pool, four stages of two
    basic blocks (64, 128, 256, 512 channels; option-B shortcuts), global average pooling, 512-d features;
    PyTorch's default initialisation. 11,173,962 parameters at 10 classes. The release's ``projection``
    Linear(512, 512), which its ``forward`` never calls, is left out."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        make_stage(64, 64, 2, 1, "B"), make_stage(64, 128, 2, 2, "B"), make_stage(128, 256, 2, 2, "B"),
        make_stage(256, 512, 2, 2, "B"), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return SplitModel(features, make_classifier(512, num_classes, classifier, scale), 512)
