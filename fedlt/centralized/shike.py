"""SHIKE (Jin et al., "Long-Tailed Visual Recognition via Self-Heterogeneous Integration with Knowledge
Excavation", CVPR 2023; jinyan-06/SHIKE): depth-wise knowledge fusion (:mod:`fedlt.models.shike`) and dynamic
knowledge transfer (:func:`fedlt.losses.shike.shike_loss`), then a classifier re-training stage.

Follows the official ``cifarTrain.py`` (``main``, ``mix_outputs``, ``train``), ``networks.py`` and ``utils.py``
(``CosineAnnealingLRWarmup``). Its CIFAR recipe (the official script trains CIFAR-100-LT at IF 100):
AutoAugment (CIFAR policy) + Cutout(16) on every batch of both stages, batch 128, SGD momentum 0.9, wd 5e-4;

- stage 1, ``cornerstone`` = 180 epochs: the DKT loss on every expert; lr per epoch e (held within the epoch)
  base + (peak − base)·(e − 1)/(W − 1) for e < W, then peak·½(1 + cos(π·(e − W)/(T − W))), with base 0.05,
  peak 0.15, W = 5 warm-up epochs, T = 180 (so 0.025, 0.05, …, 0.125, then 0.15 decaying to 0);
- stage 2, 20 epochs: new cosine classifiers (``rt_classifiers``), every other parameter frozen, BatchNorm
  in train mode (its statistics keep moving, as under the official ``model.train()``), loss
  Σ_i CE(z_i + log π, y) on instance-balanced batches; the same lr formula with base 0.05, peak 0.1, W = 5,
  T = 20. Test: the mean of the experts' logits (stage-2 classifiers after stage 2).

Official defects not copied: (1) under the pinned torch 1.11, ``optimizer.zero_grad()`` leaves zero gradients
(not ``None``) on the parameters frozen for stage 2, so its SGD still applies weight decay and momentum to the
"frozen" backbone; here the stage-2 optimizer holds the new classifiers only. (2) The stage-2 prior is the
hard-coded CIFAR-100-LT IF-100 count list (``args.label_dis``) and T of stage 1 is ``epochs − 20``; here the
training counts and the stage lengths. (3) The official script evaluates on the test set every epoch and
keeps the best test accuracy; fedlt reports the last epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.centralized.experts import check_model_variant, model_variant
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment, model_for
from fedlt.losses.shike import shike_balanced_loss, shike_loss
from fedlt.models.base import NormedLinear, make_classifier
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED
from fedlt.train import Augment, Objective, OptimConfig, TensorData


@dataclass
class WarmupCosineLR(OptimConfig):
    """``CosineAnnealingLRWarmup`` of SHIKE's ``utils.py`` (η_min = 0), stepped once per epoch: for epoch
    e = ⌊epoch⌋, ``lr`` + (``peak_lr`` − ``lr``)·(e − 1)/(W − 1) while e < W, then
    ``peak_lr``·½(1 + cos(π·(e − W)/(T − W))) with T the stage's epochs. W = 0 (the cosine from e = 0, for
    short budgets) is fedlt's; the official asserts W ≥ 2."""

    peak_lr: float = 0.15

    def lr_at(self, epoch: float, total_epochs: float) -> float:
        e, w = math.floor(epoch), int(self.warmup_epochs)
        if e < w:
            return self.lr + (self.peak_lr - self.lr) / (w - 1) * (e - 1)
        return self.peak_lr * (1 + math.cos(math.pi * (e - w) / max(total_epochs - w, 1e-12))) / 2


@CENTRALIZED.register("shike")
class SHIKE(CentralizedMethod):
    """SHIKE: stage 1 trains the depth-fused experts with DKT, stage 2 re-trains their cosine classifiers with
    the balanced softmax (module doc). Model: ``model.name`` with ``_shike`` appended (``resnet32_shike``,
    ``small_cnn_shike``)."""

    class Options(CentralizedOptions):
        num_experts: int = Field(3, gt=0, description="number of experts (official --num_exps)")
        expert_scale: float = Field(30.0, gt=0, description="scale s of the experts' cosine heads")
        hns_weight: float = Field(10.0, ge=0, description="weight of the hardest-negative suppression KL")
        autoaugment: bool = Field(True, description="AutoAugment (CIFAR policy) + Cutout on every batch (official)")
        warmup_epochs: float = Field(5.0, ge=0, description="stage 1: warm-up epochs W of the official schedule")
        warmup_lr: float = Field(0.15, gt=0, description="stage 1: the lr the warm-up reaches (centralized.lr "
                                                         "is the official base lr)")
        stage2_epochs: int = Field(20, ge=0, description="classifier re-training epochs (0: none)")
        stage2_lr: float | None = Field(0.05, gt=0, description="stage 2: base lr (None: stage 1's)")
        stage2_warmup_epochs: float = Field(5.0, ge=0, description="stage 2: warm-up epochs")
        stage2_warmup_lr: float = Field(0.1, gt=0, description="stage 2: the lr the warm-up reaches")

        @field_validator("warmup_epochs", "stage2_warmup_epochs")
        @classmethod
        def _whole_warmup(cls, value: float) -> float:
            if value != int(value) or value == 1:
                raise ValueError("must be 0 or a whole number of epochs ≥ 2 (the official schedule divides by W − 1)")
            return value

    def __init__(self, cfg: Config, train_counts: np.ndarray) -> None:
        super().__init__(cfg, train_counts)
        self.two_stage = self.opts.stage2_epochs > 0

    @staticmethod
    def expert_model(cfg: Config) -> str:
        return model_variant(cfg, "_shike")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        c = cfg.centralized
        check_model_variant(cfg, "_shike", "a depth-fused multi-expert model")
        if c.schedule != "cosine" or c.milestones:
            raise FedLTError("centralized.method=shike follows the official warm-up cosine lr "
                             "(centralized.warmup_epochs, warmup_lr): leave centralized.schedule at cosine")
        if c.epochs != int(c.epochs) or c.epochs <= c.warmup_epochs:
            raise FedLTError(f"centralized.method=shike needs whole centralized.epochs above centralized.warmup_epochs "
                             f"({c.warmup_epochs:g}), got {c.epochs:g}")
        if 0 < c.stage2_epochs <= c.stage2_warmup_epochs:
            raise FedLTError(f"centralized.stage2_epochs ({c.stage2_epochs}) must exceed centralized.stage2_warmup_"
                             f"epochs ({c.stage2_warmup_epochs:g}) for shike")
        base = c.lr if c.lr is not None else cfg.train.lr
        base2 = c.stage2_lr if c.stage2_lr is not None else base
        for stage, lr, peak, w in ((1, base, c.warmup_lr, c.warmup_epochs),
                                   (2, base2, c.stage2_warmup_lr, c.stage2_warmup_epochs if c.stage2_epochs else 0)):
            first = WarmupCosineLR(lr=lr, peak_lr=peak, warmup_epochs=w).lr_at(0, w + 1)
            if first <= 0:
                raise FedLTError(f"centralized.method=shike: the official warm-up starts stage {stage} at lr "
                                 f"{first:g} (base {lr:g} − (peak {peak:g} − base)/(W − 1), W = {w:g}): raise the "
                                 f"base lr or W, or lower the peak")

    def build_model(self, exp: Experiment) -> nn.Module:
        return model_for(self.cfg, exp, self.expert_model(self.cfg), **self.model_options())

    def model_options(self) -> dict:
        return dict(classifier="cosine", scale=self.opts.expert_scale, num_experts=self.opts.num_experts)

    def optim(self, opt: OptimConfig, stage: int) -> OptimConfig:
        fields = asdict(opt)
        if stage == 1:
            fields.update(warmup_epochs=self.opts.warmup_epochs, peak_lr=self.opts.warmup_lr)
        else:
            fields.update(warmup_epochs=self.opts.stage2_warmup_epochs, peak_lr=self.opts.stage2_warmup_lr)
        return WarmupCosineLR(**fields)

    def objective(self, epoch: int) -> Objective:
        weight = self.opts.hns_weight

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return shike_loss(model.expert_logits(x), y, weight)
        return objective

    # --- stage 2: classifier re-training ---
    def stage2_epochs(self) -> int:
        return self.opts.stage2_epochs

    def stage2_augment(self, data: TensorData) -> Augment:
        return self.augment(data)

    def start_stage2(self, model: nn.Module) -> None:
        """New cosine classifiers (the official ``rt_classifiers``); every other parameter frozen."""
        heads = [e.classifier for e in model.experts]
        if not all(isinstance(h, NormedLinear) for h in heads):
            raise FedLTError("shike's stage 2 re-trains cosine classifiers; the model's heads are not")
        model.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.rng.integers(2**31)))
            for expert, head in zip(model.experts, heads):
                new = make_classifier(head.weight.shape[0], head.weight.shape[1], "cosine", head.scale)
                expert.classifier = new.to(head.weight.device)

    def stage2_objective(self, epoch: int) -> Objective:
        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return shike_balanced_loss(model.expert_logits(x), y, self.log_pi)
        return objective
