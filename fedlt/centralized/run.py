"""The centralized epochs: train ``centralized.method`` (:class:`~fedlt.centralized.base.CentralizedMethod`) on the
pooled long-tailed set with the same trainer, model, test set and metrics as the federated runs, one epoch per
step of the shared run skeleton (:mod:`fedlt.run_loop`), resumable across the stages: an optional
self-supervised stage 0 (``centralized.pretrain``, :mod:`.pretrain`), the method's stage 1 and a decoupled
method's stage 2."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.centralized.pretrain import rotation_model, rotation_objective
from fedlt.config import Config
from fedlt.device import resolve_device
from fedlt.experiment import Experiment, augment_for, experiment_for
from fedlt.options import Stage2Options
from fedlt.registry import CENTRALIZED
from fedlt.run_loop import run_steps
from fedlt.rundir import RunDir
from fedlt.streams import Stream, seeded_rng, torch_generator
from fedlt.train import NonFiniteLoss, OptimConfig, TensorData, make_optimizer, train


def pretrain_epochs(cfg: Config) -> int:
    """Epochs of stage 0 (``centralized.pretrain_epochs`` with ``centralized.pretrain=rotation``; else 0)."""
    return cfg.centralized.pretrain_epochs if cfg.centralized.pretrain == "rotation" else 0


def centralized_optim(cfg: Config) -> OptimConfig:
    c, t = cfg.centralized, cfg.train

    def pick(key: str) -> Any:
        value = getattr(c, key)
        return value if value is not None else getattr(t, key)

    return OptimConfig(lr=pick("lr"), momentum=pick("momentum"), weight_decay=pick("weight_decay"),
                       nesterov=pick("nesterov"), batch_size=pick("batch_size"), warmup_epochs=c.warmup_epochs,
                       warmup_factor=c.warmup_factor,
                       schedule=c.schedule, milestones=list(c.milestones), gamma=c.gamma, sam=c.sam,
                       sam_flat_ratio=c.sam_flat_ratio, sam_noise_ratio=c.sam_noise_ratio)


def stage2_optim(cfg: Config, method: CentralizedMethod) -> OptimConfig:
    """Stage 2: stage 1's SGD momentum and Nesterov; lr ``stage2_lr`` (None: stage 1's); where the method has
    the :class:`~fedlt.options.Stage2Options` keys, their batch size, weight decay (None: stage 1's), warm-up,
    step milestones/gamma and schedule (None: the method's ``default_stage2_schedule``, cosine); else stage 1's
    batch size and weight decay, the method's default schedule, no warm-up."""
    base, o = centralized_optim(cfg), method.opts
    lr = getattr(o, "stage2_lr", None)
    stage2 = OptimConfig(lr=base.lr if lr is None else float(lr), momentum=base.momentum,
                         weight_decay=base.weight_decay, nesterov=base.nesterov, batch_size=base.batch_size,
                         schedule=method.stage2_schedule(cfg))
    if not isinstance(o, Stage2Options):
        return stage2
    return replace(stage2, batch_size=o.stage2_batch_size or base.batch_size,
                   weight_decay=base.weight_decay if o.stage2_weight_decay is None else o.stage2_weight_decay,
                   warmup_epochs=o.stage2_warmup_epochs, schedule=method.stage2_schedule(cfg),
                   milestones=list(o.stage2_milestones), gamma=o.stage2_gamma)


class CentralizedSteps:
    """The epochs of a centralized run (:class:`fedlt.run_loop.Steps`): ``pretrain_epochs`` of rotation prediction
    (stage 0, with ``centralized.pretrain=rotation``), ``ceil(epochs)`` epochs of stage 1, then a decoupled
    method's ``stage2_epochs`` on the frozen backbone; a checkpoint after every epoch."""

    unit = "epoch"
    checkpoint_every = 1

    def __init__(self, cfg: Config, exp: Experiment, device: torch.device) -> None:
        self.cfg, self.exp, self.device = cfg, exp, device
        self.method: CentralizedMethod = CENTRALIZED.get(cfg.centralized.method)(cfg, exp.train_counts)
        self.label = f"centralized {cfg.centralized.method}"
        self.model: nn.Module = self.method.build_model(exp).to(device)
        self.opt = self.method.optim(centralized_optim(cfg), 1)
        self.opt2 = self.method.optim(stage2_optim(cfg, self.method), 2)
        self.data: TensorData = exp.tensor_data("train", device=device)
        self.test = exp.tensor_data("test", device=device)
        self.generator = torch_generator(cfg.seed, Stream.CENTRAL)
        self.augment, self.augment2 = self.method.augment(self.data), self.method.stage2_augment(self.data)
        self.epochs = cfg.centralized.epochs
        self.stage1, self.stage2 = int(np.ceil(self.epochs)), self.method.stage2_epochs()
        self.pretrain = pretrain_epochs(cfg)
        self.total = self.pretrain + self.stage1 + self.stage2
        self.stage = 0 if self.pretrain else 1
        if self.pretrain:
            head_seed = int(seeded_rng(cfg.seed, Stream.INIT, Stream.PRETRAIN).integers(2**31))
            self.rotation = rotation_model(self.model, head_seed).to(device)
            self.rotation_rng = seeded_rng(cfg.seed, Stream.CENTRAL, Stream.PRETRAIN)
            self.optimizer = make_optimizer(self.rotation, self.opt)
        else:
            self.optimizer = make_optimizer(self.model, self.opt)

    def begin_stage1(self) -> None:
        """After stage 0: the method's model (pre-trained features, its own classifier), a fresh optimizer."""
        self.optimizer = make_optimizer(self.model, self.opt)
        self.stage = 1

    def begin_stage2(self) -> None:
        self.method.start_stage2(self.model)
        self.model.to(self.device)
        if self.stage2 > 0:
            self.optimizer = make_optimizer(self.model, self.opt2, self.method.stage2_param_groups(self.model))
        self.stage = 2

    def start(self) -> None:
        pass

    def step(self, t: int) -> dict:
        try:
            return self._train_epoch(t)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"epoch {t} (stage {self.stage}): {exc}") from None

    def _train_epoch(self, t: int) -> dict:
        epoch = t - 1
        if self.stage == 0 and epoch >= self.pretrain:
            self.begin_stage1()
        if self.stage == 0:
            result = train(self.rotation, self.data, rotation_objective(self.rotation_rng), opt=self.opt, epochs=1.0,
                           generator=self.generator, augment=augment_for(self.cfg, self.data),
                           optimizer=self.optimizer, start_epoch=epoch, total_epochs=self.pretrain)
            return {"stage": 0, "train_loss": result.loss, "train_images": result.num_examples}
        epoch -= self.pretrain
        if epoch >= self.stage1 and self.stage == 1:
            self.begin_stage2()
        stage_epoch = epoch if self.stage == 1 else epoch - self.stage1
        own = self.method.train_epoch(self.stage, self.model, self.data, self.optimizer, self.generator,
                                      self.opt if self.stage == 1 else self.opt2,
                                      self.augment if self.stage == 1 else self.augment2, stage_epoch)
        if own is not None:  # a method that trains its epochs its own way (LFME's experts and student)
            result = own
        elif self.stage == 1:
            self.method.begin_epoch(self.model, self.data, self.augment, epoch)
            result = train(self.model, self.data, self.method.objective(epoch), opt=self.opt,
                           epochs=min(1.0, self.epochs - epoch), generator=self.generator, augment=self.augment,
                           sampler=self.method.sampler(), optimizer=self.optimizer, start_epoch=epoch,
                           total_epochs=self.epochs)
        else:
            result = train(self.model, self.data, self.method.stage2_objective(epoch - self.stage1), opt=self.opt2,
                           epochs=1.0, generator=self.generator, augment=self.augment2,
                           sampler=self.method.stage2_sampler(), optimizer=self.optimizer,
                           start_epoch=epoch - self.stage1, total_epochs=self.stage2)
        return {"stage": self.stage, "train_loss": result.loss, "train_images": result.num_examples}

    def evaluate(self, final: bool) -> dict:
        return self.method.evaluate(self.model, self.test, self.exp.train_counts, self.cfg.eval.batch_size, final)

    def finish(self) -> bool:
        if self.method.two_stage and self.stage == 1:  # a second stage without training (τ-norm)
            self.begin_stage2()
            return True
        return False

    def state_dict(self) -> dict:
        state = {"stage": self.stage, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "method": self.method.state_dict()}
        if self.pretrain:
            state["pretrain"] = {"head": self.rotation.classifier.state_dict(),
                                 "rng": self.rotation_rng.bit_generator.state}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.pretrain:
            self.rotation.classifier.load_state_dict(state["pretrain"]["head"])
            self.rotation_rng.bit_generator.state = state["pretrain"]["rng"]
            if state["stage"] >= 1:
                self.begin_stage1()
        if state["stage"] == 2:
            self.begin_stage2()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state["method"])

    def summary(self) -> dict:
        return {"mode": "centralized", "method": self.cfg.centralized.method, "epochs": self.epochs,
                "pretrain": self.cfg.centralized.pretrain, "pretrain_epochs": self.pretrain,
                "stage2_epochs": self.stage2, "train_class_counts": self.exp.train_counts.tolist()}


def run_centralized(cfg: Config, run: RunDir) -> dict:
    """Train ``centralized.method`` on the pooled long-tailed set, epoch by epoch, resumable; return the summary."""
    exp = experiment_for(cfg)
    device = resolve_device(cfg.device)
    partition = (exp.train_counts[None, :], exp.train_counts, exp.test.class_counts, "pooled")
    return run_steps(cfg, run, CentralizedSteps(cfg, exp, device), partition, device)
