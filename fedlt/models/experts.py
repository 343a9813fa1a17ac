"""Multi-expert models: a shared stem, then per-expert later stages and classifiers; output = mean of the
experts' logits (RIDE / BalPoE / MDCS / GBME layout).

GBME (Zeng et al., ICCV 2023) on CIFAR: ResNet-32 with a shared conv1/bn1/layer1 (16 channels) and per
expert layer2 (24 channels), layer3 (48 channels) and a cosine classifier with scale 30 (Spinozaaa/Federated-
Long-tailed-Learning ``fedml_api/model/multiexp_model/ldam_drw_resnets/expert_resnet_cifar.py`` ``ResNet_s``,
``reduce_dimension=True, use_norm=True``). BalPoE's is the same ``ResNet_s`` (emasa/BalPoE-CalibratedLT
``model/ldam_drw_resnets/expert_resnet_cifar.py``) with ``reduce_dimension: false`` (32/64 channels), which the
method sets. Option-A shortcuts pad (planes − in_planes)/2 zero channels on each side, as those files do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from fedlt.errors import FedLTError
from fedlt.models.base import SplitModel, kaiming_normal_init, make_classifier
from fedlt.models.cnn import _norm
from fedlt.models.resnet_cifar import make_stage
from fedlt.options import HeadOptions
from fedlt.registry import MODELS

if TYPE_CHECKING:
    from fedlt.config import Config


class ExpertOptions(HeadOptions):
    """A multi-expert model: cosine heads with scale 30 by default (GBME, RIDE), ``num_experts`` branches."""

    classifier: Literal["linear", "cosine"] = Field("cosine", description="each expert's head: linear or cosine")
    scale: float = Field(30.0, gt=0, description="scale s of the cosine heads")
    num_experts: int = Field(3, gt=0, description="number of experts M")


def require_experts(cfg: "Config", who: str) -> None:
    """Raise a one-line :class:`FedLTError` unless ``cfg.model`` is a multi-expert model (its ``Options`` are
    :class:`ExpertOptions`): the config-time check of a part (``who``) that trains experts one by one."""
    if not isinstance(cfg.model, ExpertOptions):
        names = [n for n in MODELS if issubclass(MODELS.options(n), ExpertOptions)]
        raise FedLTError(f"{who} needs a multi-expert model, got model.name={cfg.model.name!r}: set model.name "
                         f"to one of {', '.join(names)}")


def require_single_network(cfg: "Config", who: str) -> None:
    """Raise a one-line :class:`FedLTError` if ``cfg.model`` is a multi-expert (``*_experts``) or depth-fused
    (``*_shike``) model: the config-time check of a part (``who``, saying what it does to the head) that replaces
    or extends the one classifier of a single network."""
    if cfg.model.name.endswith(("_experts", "_shike")):
        raise FedLTError(f"{who}, and model.name={cfg.model.name!r} is a multi-expert model: choose a single "
                         f"network, e.g. small_cnn or resnet32")


def require_unset_head(cfg: "Config", who: str) -> None:
    """Raise a one-line :class:`FedLTError` if ``cfg.model`` gives its head options (``classifier``, ``scale``)
    values other than their defaults: the config-time check of a part (``who``, saying what head it puts in
    place) that replaces the head, so those values would be recorded in config.yaml and not used. Compared with
    the defaults, not with the keys the user wrote: a config rebuilt from its dump has every key set."""
    fields = type(cfg.model).model_fields
    changed = [f"model.{k}={getattr(cfg.model, k)}" for k in ("classifier", "scale")
               if k in fields and getattr(cfg.model, k) != fields[k].default]
    if changed:
        raise FedLTError(f"{who}, so {' and '.join(changed)} would not be used: drop "
                         f"{'them' if len(changed) > 1 else 'it'}")


class MultiExpertModel(nn.Module):
    """z̄ = (1/M)·Σ_m z_m with z_m = expert_m(stem(x)); each expert is a :class:`SplitModel` on the stem's
    output. ``expert_logits`` gives the (M, N, C) stack, ``expert_forward(x, m)`` expert m's logits alone and
    ``train_only_expert(m)`` freezes every other expert (GBME's expert phase)."""

    def __init__(self, stem: nn.Module, experts: list[SplitModel]) -> None:
        super().__init__()
        self.stem = stem
        self.experts = nn.ModuleList(experts)
        self.feature_dim = experts[0].feature_dim

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_forward(self, x: torch.Tensor, m: int, run_others: bool = False) -> torch.Tensor:
        """z_m = expert_m(stem(x)): expert ``m``'s logits. The other experts are not run, unless ``run_others``:
        then they run on the same stem output without gradient, so that in training mode their BatchNorm
        statistics follow the batch as in a forward of the whole model (GBME's release, whose expert phase
        runs every expert and trains one)."""
        s = self.stem(x)
        if run_others:
            with torch.no_grad():
                for i, expert in enumerate(self.experts):
                    if i != m:
                        expert(s)
        return self.experts[m](s)

    def expert_model(self, m: int) -> nn.Module:
        """Expert ``m`` alone as a model, x -> z_m (it shares this model's stem and expert parameters)."""
        return nn.Sequential(self.stem, self.experts[m])

    def train_only_expert(self, m: int | None) -> None:
        """Let gradients reach the stem and expert ``m`` only (``None``: every expert): the other experts'
        parameters get ``requires_grad=False``, so they get no gradient and no weight decay."""
        self.stem.requires_grad_(True)
        for i, expert in enumerate(self.experts):
            expert.requires_grad_(m is None or i == m)

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The (M, N, C) stack of every expert's logits."""
        s = self.stem(x)
        return torch.stack([e(s) for e in self.experts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert_logits(x).mean(0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated expert features (M·d)."""
        s = self.stem(x)
        return torch.cat([e.features(s) for e in self.experts], dim=1)


CIFAR_RESNET_EXPERTS = ("resnet8_experts", "resnet32_experts")
"""The multi-expert CIFAR ResNets whose expert widths a method sets (``reduce_dimension``: 24/48, else 32/64)."""


@MODELS.register("resnet32_experts", options=ExpertOptions)
def resnet32_experts(num_classes: int, in_channels: int = 3, num_experts: int = 3, widths=(16, 24, 48),
                     classifier: str = "cosine", scale: float = 30.0, shared_layer1: bool = True,
                     shared_stem: bool = True) -> MultiExpertModel:
    """ResNet-32 (n = 5 blocks per stage) with a shared stem + layer1 and per-expert layer2, layer3, head;
    ``shared_layer1=False``: only conv1/bn1 shared, layer1 per expert too (TLC's ``ResnetCifar.py``);
    ``shared_stem=False``: M whole ResNet-32s (empty stem; NCL's independent networks)."""
    return cifar_resnet_experts(5, num_classes, in_channels, num_experts, widths, classifier, scale, shared_layer1,
                                shared_stem)


@MODELS.register("resnet8_experts", options=ExpertOptions)
def resnet8_experts(num_classes: int, in_channels: int = 3, num_experts: int = 3, widths=(16, 24, 48),
                    classifier: str = "cosine", scale: float = 30.0, shared_layer1: bool = True,
                    shared_stem: bool = True) -> MultiExpertModel:
    """:func:`resnet32_experts` with one block per stage (ResNet-8's depth): fedlt's multi-expert model for CPU
    budgets, where the single-network methods run ``resnet8`` (no paper uses it; ≈ 1/5 of ResNet-32's compute)."""
    return cifar_resnet_experts(1, num_classes, in_channels, num_experts, widths, classifier, scale, shared_layer1,
                                shared_stem)


def cifar_resnet_experts(n: int, num_classes: int, in_channels: int, num_experts: int, widths, classifier: str,
                         scale: float, shared_layer1: bool, shared_stem: bool) -> MultiExpertModel:
    """The CIFAR ResNet-(6n+2) multi-expert layout of :func:`resnet32_experts` with n blocks per stage."""

    def conv_block() -> list[nn.Module]:
        return [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True)]

    if not shared_stem:
        stem: nn.Module = nn.Identity()
    else:
        stem = nn.Sequential(*conv_block(), *([make_stage(widths[0], widths[0], n, 1)] if shared_layer1 else []))
    experts = []
    for _ in range(num_experts):
        if not shared_stem:
            own = [*conv_block(), make_stage(widths[0], widths[0], n, 1)]
        else:
            own = [] if shared_layer1 else [make_stage(widths[0], widths[0], n, 1)]
        features = nn.Sequential(*own, make_stage(widths[0], widths[1], n, 2), make_stage(widths[1], widths[2], n, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        experts.append(SplitModel(features, make_classifier(widths[2], num_classes, classifier, scale), widths[2]))
    model = MultiExpertModel(stem, experts)
    return kaiming_normal_init(model)


@MODELS.register("small_cnn_experts", options=ExpertOptions)
def small_cnn_experts(num_classes: int, in_channels: int = 1, num_experts: int = 3, width: int = 32,
                      norm: str = "group", classifier: str = "cosine", scale: float = 30.0,
                      shared_stem: bool = True) -> MultiExpertModel:
    """The small CNN with a shared first conv block and per-expert second block, FC(128) and head;
    ``shared_stem=False``: M whole small CNNs (empty stem)."""

    def stem_layers() -> list[nn.Module]:
        return [nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"), _norm(norm, width),
                nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    stem = nn.Sequential(*stem_layers()) if shared_stem else nn.Identity()
    experts = []
    for _ in range(num_experts):
        features = nn.Sequential(*([] if shared_stem else stem_layers()),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=norm == "none"), _norm(norm, 2 * width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True))
        experts.append(SplitModel(features, make_classifier(128, num_classes, classifier, scale), 128))
    return MultiExpertModel(stem, experts)
