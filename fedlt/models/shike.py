"""SHIKE's multi-expert model: depth-wise knowledge fusion (Jin et al., "Long-Tailed Visual Recognition via
Self-Heterogeneous Integration with Knowledge Excavation", CVPR 2023; jinyan-06/SHIKE ``networks.py``
``ResNet_MoE``, ``ShallowExpert``, ``StridedConv``).

The backbone's shared stages are a :class:`SharedStages` stem that returns EVERY stage's output (the hook
the fusion needs), so the model stays a :class:`~fedlt.models.experts.MultiExpertModel` (``expert_logits``,
``expert_forward``, ``train_only_expert`` unchanged). Expert m (:class:`DepthFusedExpert`) reads two of them:

    h_m = GAP( deep_m(s_L) ⊙ shallow_m(s_{m mod L}) ),   z_m = s·cos(W_m, h_m)

with s_1 … s_L the shared stages' outputs (L = 2: ResNet-32's layer1 and layer2), deep_m the expert's own last
stage (layer3) and shallow_m = ``m``'s ShallowExpert: L − (m mod L) strided 3×3 conv-BN layers (stride 2,
channels doubled), a ReLU after each but the second (``use_relu=(k != 1)`` in ``ShallowExpert``), so that it
maps the shallower feature to deep_m's shape. The product is element-wise. With 3 experts on ResNet-32 the
experts read layer1, layer2, layer1 through 2, 1, 2 strided convs (``exp_depth = [2, 1, 2]``).

``resnet32_shike`` is the official CIFAR model (``resnet32(num_exps=3, use_norm=True)``): shared conv1/bn1,
layer1 (16) and layer2 (32), per expert layer3 (64) and a cosine classifier with s = 30; basic blocks with
option-B shortcuts (1×1 conv + BN, the default ``option='B'`` of its ``BasicBlock``); Kaiming-normal
convolutions except the shallow experts', which keep PyTorch's default initialisation (the official
``self.apply(_weights_init)`` runs before they are built). The official ``shallow_avgpool`` is never used and
is left out. ``small_cnn_shike`` is the same layout on the small CNN (shared conv blocks of w and 2w
channels, per expert a strided conv of 4w channels).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedlt.models.base import kaiming_normal_init, make_classifier
from fedlt.models.cnn import _norm
from fedlt.models.experts import MultiExpertModel
from fedlt.models.resnet_cifar import make_stage
from fedlt.options import HeadOptions
from fedlt.registry import MODELS


class DepthFusedOptions(HeadOptions):
    """A depth-fused multi-expert model; not an ``ExpertOptions`` model, so the federated expert methods
    (GBME, :func:`~fedlt.models.experts.require_experts`), not tested with it, do not offer it."""

    classifier: Literal["linear", "cosine"] = Field("cosine", description="each expert's head: linear or cosine")
    scale: float = Field(30.0, gt=0, description="scale s of the cosine heads")
    num_experts: int = Field(3, gt=0, description="number of experts M")


class SharedStages(nn.Module):
    """The shared backbone as a sequence of stages; ``forward`` returns the list of every stage's output."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def shallow_expert(in_channels: int, depth: int, norm: str = "batch") -> nn.Sequential:
    """``depth`` strided (stride 2) 3×3 conv-norm layers, channels doubled by each, ReLU after all but the second
    (the official ``StridedConv(..., use_relu=(k != 1))``)."""
    layers: list[nn.Module] = []
    for k in range(depth):
        c = in_channels * 2 ** k
        layers += [nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), _norm(norm, 2 * c)]
        if k != 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DepthFusedExpert(nn.Module):
    """h = GAP(deep(s_L) ⊙ shallow(s_source)), z = classifier(h), on the list of shared-stage outputs."""

    def __init__(self, deep: nn.Module, shallow: nn.Module, source: int, classifier: nn.Module,
                 feature_dim: int) -> None:
        super().__init__()
        self.deep, self.shallow, self.source = deep, shallow, source
        self.classifier = classifier
        self.feature_dim = feature_dim

    def features(self, shared: list[torch.Tensor]) -> torch.Tensor:
        return (self.deep(shared[-1]) * self.shallow(shared[self.source])).mean((2, 3))

    def forward(self, shared: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.features(shared))


def depth_fused_experts(stages: list[nn.Module], channels: list[int], make_deep, num_experts: int, feature_dim: int,
                        num_classes: int, classifier: str, scale: float, norm: str) -> MultiExpertModel:
    """Expert m reads shared stage m mod L (L = len(stages), of ``channels``) through L − (m mod L) strided convs."""
    experts = []
    for m in range(num_experts):
        source = m % len(stages)
        depth = len(stages) - source
        experts.append(DepthFusedExpert(make_deep(), shallow_expert(channels[source], depth, norm), source,
                                        make_classifier(feature_dim, num_classes, classifier, scale), feature_dim))
    return MultiExpertModel(SharedStages(stages), experts)


@MODELS.register("resnet32_shike", options=DepthFusedOptions)
def resnet32_shike(num_classes: int, in_channels: int = 3, num_experts: int = 3, classifier: str = "cosine",
                   scale: float = 30.0) -> MultiExpertModel:
    """The official SHIKE ResNet-32 (n = 5 blocks per stage, option-B shortcuts): shared stem + layer1 (16),
    layer2 (32); per expert layer3 (64) fused with a shallow expert, and a head."""
    n = 5
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         make_stage(16, 16, n, 1, "B"))
    stages = [stem, make_stage(16, 32, n, 2, "B")]
    model = depth_fused_experts(stages, [16, 32], lambda: make_stage(32, 64, n, 2, "B"), num_experts, 64,
                                num_classes, classifier, scale, "batch")
    shallow = {id(p) for e in model.experts for p in e.shallow.parameters()}
    return kaiming_normal_init(model, frozenset(shallow))


@MODELS.register("small_cnn_shike", options=DepthFusedOptions)
def small_cnn_shike(num_classes: int, in_channels: int = 1, num_experts: int = 3, width: int = 32,
                    norm: str = "batch", classifier: str = "cosine", scale: float = 30.0) -> MultiExpertModel:
    """The small CNN's two conv blocks shared (w, 2w channels, each max-pooled); per expert a strided conv block
    of 4w channels fused with a shallow expert on block 1 or 2; 4w-d features.

    BatchNorm, as the official model (the small CNN's GroupNorm default is for federated averaging): with
    GroupNorm the fused features start almost parallel (per-sample normalised, mostly positive factors) and the
    Fashion-MNIST-LT table run collapsed to one predicted class (mean pairwise feature cosine 1.0), under
    plain Σ CE too; with BatchNorm 40 steps at lr 0.1 already predict 6–8 classes."""
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out),
                             nn.ReLU(inplace=True), nn.MaxPool2d(2))

    def deep() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 2, 1, bias=norm == "none"), _norm(norm, 4 * width),
                             nn.ReLU(inplace=True))

    return depth_fused_experts([block(in_channels, width), block(width, 2 * width)], [width, 2 * width], deep,
                               num_experts, 4 * width, num_classes, classifier, scale, norm)
