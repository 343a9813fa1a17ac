"""GBME's multi-expert ResNet-18 for its CIFAR-10 runs (Zeng et al., "Global Balanced Experts for Federated
Long-Tailed Learning", ICCV 2023): ``--model resnet18_gn`` in Spinozaaa/Federated-Long-tailed-Learning
``fedml_experiments/clsimb_fedavg/main_fedavg.py`` builds ``ResNet18GNModel(reduce_dimension=True,
use_norm=True, num_experts, group_norm=8)`` (``fedml_api/model/multiexp_model/model.py``), whose backbone is
``ResNet_GN(BasicBlock_GN, [2, 2, 2, 2])`` in ``fedml_api/model/multiexp_model/ldam_drw_resnets/
expert_resnet_cifar.py``. What that code computes, followed here layer by layer:

- shared stem: 7×7 conv, stride 2, padding 3, 64 channels, no bias; GroupNorm; ReLU; *no* max-pool
  (a 32×32 image gives 16×16 maps);
- shared layer1: two basic blocks of 64 channels whose norms are **BatchNorm** — ``ResNet_GN`` builds layer1
  with ``_make_layer(...)`` without passing ``group_norm``, so its default 0 selects ``nn.BatchNorm2d``;
- per expert: layer2, layer3, layer4 (two basic blocks each, 128 / 256 / 512 channels, stride 2 in the first
  block) with GroupNorm, then global average pooling and a 512-d head;
- basic block: conv3×3-norm-ReLU-conv3×3-norm, plus the residual, ReLU; where the shape changes the residual
  is ``downsample`` = 1×1 conv (stride 2, no bias) + norm (a projection, "option B");
- head: ``NormedLinear`` (cosine) times s = 30 (``use_norm=True``), or ``nn.Linear`` with s = 1;
- initialisation: Kaiming-normal on every ``nn.Conv2d`` and ``nn.Linear`` weight; NormedLinear's own
  uniform-renorm draw; norms' affine weight 1, bias 0.

The official GroupNorm is ``fedml_api/model/basic/group_normalization.py`` ``GroupNorm2d(planes, 8)``, called
through ``norm2d(planes, num_channels_per_group=8)``: it normalises groups of **8 consecutive channels**
(planes/8 groups) with the batch statistics of each sample (always, also in eval mode; eps 1e-5) and has **one
affine weight and bias per group** (planes/8 of each), not one per channel as in Wu & He (2018) and
``nn.GroupNorm``. :class:`GroupNormPerGroupAffine` computes exactly that (the parameter count included).

Not copied, on purpose: (1) with ``num_experts=1`` the release's ``ResNet18GNModel`` silently builds a
ResNet-32 (``resnet_cifar.ResNet_s``) instead; here one expert is a one-expert ResNet-18. (2) Each
``BasicBlock_GN`` also holds an option-A ``shortcut`` lambda inherited from ``BasicBlock`` that its forward
never calls; it has no parameters and is left out. (3) ``F.avg_pool2d(out, out.size(3))`` is written as
``nn.AdaptiveAvgPool2d(1)`` (the same global mean on the square maps of CIFAR/Fashion-MNIST inputs).
``in_channels`` other than 3 (Fashion-MNIST) only changes the stem's input width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from fedlt.models.base import SplitModel, kaiming_normal_init, make_classifier
from fedlt.models.experts import ExpertOptions, MultiExpertModel
from fedlt.registry import MODELS

WIDTHS = (64, 128, 256, 512)  # stem/layer1, then each expert's layer2, layer3, layer4


class GroupNormPerGroupAffine(nn.Module):
    """GBME's ``GroupNorm2d`` (module docstring): x̂ = (x − μ_g)/√(σ²_g + ε) over each sample's group g of
    ``channels_per_group`` consecutive channels, then y = γ_g·x̂ + β_g with one (γ_g, β_g) per group."""

    def __init__(self, num_channels: int, channels_per_group: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % channels_per_group:
            raise ValueError(f"{num_channels} channels do not split into groups of {channels_per_group}")
        self.channels_per_group = channels_per_group
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels // channels_per_group))
        self.bias = nn.Parameter(torch.zeros(num_channels // channels_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, x.shape[1] // self.channels_per_group, eps=self.eps)
        gamma = self.weight.repeat_interleave(self.channels_per_group)[None, :, None, None]
        beta = self.bias.repeat_interleave(self.channels_per_group)[None, :, None, None]
        return x * gamma + beta


def norm2d(planes: int, channels_per_group: int) -> nn.Module:
    """The official ``norm2d``: GBME's GroupNorm with ``channels_per_group`` channels per group, BatchNorm at 0."""
    return GroupNormPerGroupAffine(planes, channels_per_group) if channels_per_group > 0 else nn.BatchNorm2d(planes)


class BasicBlockGN(nn.Module):
    """The official ``BasicBlock_GN``: relu(norm(conv3×3(relu(norm(conv3×3(x))))) + r(x)), r = identity, or
    1×1 conv (stride) + norm where the stride or width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, channels_per_group: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm2d(planes, channels_per_group)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm2d(planes, channels_per_group)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            norm2d(planes, channels_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def make_gn_stage(in_planes: int, planes: int, stride: int, channels_per_group: int, blocks: int = 2
                  ) -> nn.Sequential:
    """The official ``ResNet_GN._make_layer``: ``blocks`` basic blocks, the first with ``stride``."""
    return nn.Sequential(BasicBlockGN(in_planes, planes, stride, channels_per_group),
                         *[BasicBlockGN(planes, planes, 1, channels_per_group) for _ in range(blocks - 1)])


class ResNet18GNExpertOptions(ExpertOptions):
    """GBME's ResNet-18 experts: :class:`ExpertOptions` plus the GroupNorm's channels per group."""

    channels_per_group: int = Field(8, ge=0, description="channels per GroupNorm group (the release's group_norm: "
                                    "8 for --model resnet18_gn); 0: BatchNorm everywhere (--model resnet18)")

    @field_validator("channels_per_group")
    @classmethod
    def _divides_the_widths(cls, value: int) -> int:
        if value and WIDTHS[0] % value:
            raise ValueError("must divide the 64 stem channels (1, 2, 4, 8, 16, 32 or 64) or be 0")
        return value


@MODELS.register("resnet18_gn_experts", options=ResNet18GNExpertOptions)
def resnet18_gn_experts(num_classes: int, in_channels: int = 3, num_experts: int = 3, classifier: str = "cosine",
                        scale: float = 30.0, channels_per_group: int = 8, shared_stem: bool = True
                        ) -> MultiExpertModel:
    """GBME's ``ResNet_GN`` (module docstring): a shared GroupNorm stem and BatchNorm layer1, per-expert
    layer2-4 with GroupNorm and a 512-d head; 33.2M parameters at 3 experts and 10 classes
    (each expert's layer2-4 and head 11.0M).
    ``shared_stem=False``: M whole networks (empty stem; NCL's independent networks)."""
    cpg = channels_per_group

    def stem_layers() -> list[nn.Module]:
        return [nn.Conv2d(in_channels, WIDTHS[0], 7, 2, 3, bias=False), norm2d(WIDTHS[0], cpg), nn.ReLU(inplace=True),
                make_gn_stage(WIDTHS[0], WIDTHS[0], 1, 0)]  # layer1: BatchNorm (the release passes no group_norm)

    stem = nn.Sequential(*stem_layers()) if shared_stem else nn.Identity()
    experts = []
    for _ in range(num_experts):
        layers = [make_gn_stage(WIDTHS[i], WIDTHS[i + 1], 2, cpg) for i in range(3)]  # layer2, layer3, layer4
        features = nn.Sequential(*([] if shared_stem else stem_layers()), *layers, nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())
        experts.append(SplitModel(features, make_classifier(WIDTHS[3], num_classes, classifier, scale), WIDTHS[3]))
    model = MultiExpertModel(stem, experts)
    return kaiming_normal_init(model)
