"""The centralized-method contract: :class:`CentralizedMethod`, what the epoch loop (:mod:`.run`) asks a method.

A method builds its model and gives, from the training class counts, an objective, a sampler, an
augmentation and an optional post-hoc logit transform; a two-stage method (:mod:`.decoupled`) also changes the
model for a second stage. A method that is "just a loss" only names a registered loss of
:mod:`fedlt.losses` (``loss``) and its options (``loss_options``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.config import Config
from fedlt.data.augment import strong_augment
from fedlt.errors import FedLTError
from fedlt.evaluation import evaluate_model
from fedlt.experiment import Experiment, augment_for, model_for
from fedlt.losses import log_prior, loss_objective
from fedlt.options import CentralizedOptions
from fedlt.registry import LOSSES
from fedlt.samplers import make_sampler
from fedlt.streams import Stream, seeded_rng
from fedlt.train import Augment, Objective, OptimConfig, Sampler, TensorData, TrainResult, cross_entropy_objective


class StrongView:
    """Crop/flip, then AutoAugment (CIFAR policy, one sub-policy per ``chunk`` images) + Cutout(``cutout``)."""

    def __init__(self, weak: Augment, mean: torch.Tensor, std: torch.Tensor, cutout: int, chunk: int) -> None:
        self.weak, self.mean, self.std, self.cutout, self.chunk = weak, mean, std, cutout, chunk

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return strong_augment(self.weak(x, generator), self.mean, self.std, generator, self.cutout, self.chunk)


def check_lr_not_all_zero(cfg: Config, method: type[CentralizedMethod]) -> None:
    """``cosine_epoch_end`` (the cosine stepped before each epoch, as classifier-balancing's stage 2) runs the
    last epoch at lr 0: a stage of one epoch or less, without warm-up, would train at lr 0 throughout and report
    an untrained stage as a finished run. Refused, for stage 1 and a two-stage method's stage 2."""
    c = cfg.centralized
    stages = [("centralized.schedule", c.schedule, "", "centralized.epochs", c.epochs, c.warmup_epochs)]
    if method.two_stage:
        whose = "" if getattr(c, "stage2_schedule", None) else f" ({c.method}'s own)"
        stages.append(("centralized.stage2_schedule", method.stage2_schedule(cfg), whose, "centralized.stage2_epochs",
                       getattr(c, "stage2_epochs", 0), getattr(c, "stage2_warmup_epochs", 0)))
    for key, schedule, whose, epochs_key, epochs, warmup in stages:
        if schedule == "cosine_epoch_end" and 0 < epochs <= 1 and not warmup:
            raise FedLTError(f"{key}={schedule}{whose} runs the last epoch at lr 0 (the cosine stepped before each "
                             f"epoch) and {epochs_key}={epochs:g} has no other: give at least 2 epochs, or "
                             f"{key}=cosine")


class CentralizedMethod:
    """Cross-entropy with instance-balanced sampling (the reference every long-tail method is measured against).

    Stage 1 trains ``LOSSES.get(self.loss)(class_counts, **self.loss_options(epoch))`` on ``model(x)``; a
    subclass that is just another loss sets ``loss`` and overrides ``loss_options``.
    """

    Options = CentralizedOptions  # a method with keys of its own subclasses this (``class Options(...)``)
    two_stage = False
    loss = "ce"  # the registered loss (fedlt.losses) of stage 1

    def __init__(self, cfg: Config, train_counts: np.ndarray) -> None:
        self.cfg = cfg
        self.train_counts = train_counts
        self.class_counts = torch.as_tensor(train_counts)
        self.opts = cfg.centralized
        self.epochs = float(cfg.centralized.epochs)
        self.num_classes = len(train_counts)
        self.log_pi = log_prior(self.class_counts)
        self.rng = seeded_rng(cfg.seed, Stream.CENTRAL, Stream.METHOD)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, as a one-line :class:`~fedlt.errors.FedLTError`, a config this method cannot run (a check
        across sections; :func:`fedlt.config.check_parts` calls it when the config is read)."""
        check_lr_not_all_zero(cfg, cls)

    # --- stage 1 ---
    def build_model(self, exp: Experiment) -> nn.Module:
        return model_for(self.cfg, exp, **self.model_options())

    def model_options(self) -> dict:
        """The model options this method sets itself, over the config's ``model.*`` (LDAM's cosine head, an
        expert method's number of experts); a config that sets one of them to another value is refused before
        any run (:func:`fedlt.experiment.check_overridden_model_keys`)."""
        return {}

    def begin_epoch(self, model: nn.Module, data: TensorData, augment: Augment | None, epoch: int) -> None:
        """Called before each stage-1 epoch with the current model and the training data (AREA's weights)."""

    def train_epoch(self, stage: int, model: nn.Module, data: TensorData, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, opt: OptimConfig, augment: Augment | None,
                    epoch: int) -> TrainResult | None:
        """Train epoch ``epoch`` (0-based, within ``stage``) its own way and return its result; None (the default):
        the run's generic epoch of ``objective``/``sampler`` (stage 1) or ``stage2_objective`` (stage 2)."""
        return None

    def loss_options(self, epoch: int) -> dict[str, Any]:
        """The options of ``loss`` at ``epoch`` (keywords of its factory, from ``self.opts``)."""
        return {}

    def objective(self, epoch: int) -> Objective:
        return loss_objective(LOSSES.get(self.loss)(self.class_counts, **self.loss_options(epoch)))

    def sampler(self) -> Sampler:
        return make_sampler(self.opts.sampler, self.epochs)

    def augment(self, data: TensorData) -> Augment:
        """Crop/flip; with ``autoaugment`` (the long recipes) + AutoAugment + Cutout(``cutout``) per image."""
        weak = augment_for(self.cfg, data)
        if not self.opts.autoaugment:
            return weak
        return StrongView(weak, data.mean, data.std, self.opts.cutout, self.opts.augment_chunk)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def evaluate(self, model: nn.Module, test: TensorData, train_counts: np.ndarray, batch_size: int,
                 with_bins: bool) -> dict:
        """Test metrics of ``model`` (:func:`~fedlt.evaluation.evaluate_model` of ``transform_logits``); a method
        with a test-time combination of its own (TLC) overrides this and may add metrics."""
        return evaluate_model(model, test, train_counts, batch_size, self.transform_logits, with_bins=with_bins)

    def optim(self, opt: OptimConfig, stage: int) -> OptimConfig:
        """The optimizer settings of ``stage`` (1 or 2) made from the config's ``opt``; a method with an lr
        schedule of its own returns an :class:`OptimConfig` whose ``lr_at`` is that schedule (SHIKE)."""
        return opt

    # --- second stage (DecoupledMethod) ---
    def stage2_epochs(self) -> int:
        return 0

    def start_stage2(self, model: nn.Module) -> None:
        """Change ``model`` for stage 2 (structure first, deterministic; then weights)."""

    def stage2_objective(self, epoch: int) -> Objective:
        return cross_entropy_objective

    def stage2_sampler(self) -> Sampler:
        return make_sampler("instance")

    def stage2_augment(self, data: TensorData) -> Augment:
        """The augmentation of stage 2: crop/flip, without stage 1's AutoAugment/Cutout (SHIKE and CC-SAM keep
        their stage-1 augmentation)."""
        return augment_for(self.cfg, data)

    default_stage2_schedule = "cosine"  # stage 2's lr schedule where centralized.stage2_schedule is None

    @classmethod
    def stage2_schedule(cls, cfg: Config) -> str:
        """Stage 2's lr schedule: ``centralized.stage2_schedule``, or the method's own where that is None or the
        method has no such key."""
        return getattr(cfg.centralized, "stage2_schedule", None) or cls.default_stage2_schedule

    def stage2_param_groups(self, model: nn.Module) -> list[dict] | None:
        """Parameter groups of the stage-2 optimizer (``{"params", "lr_scale"}``); None: one group."""
        return None

    # --- resumable state beyond the model ---
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
