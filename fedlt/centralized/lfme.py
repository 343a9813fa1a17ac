"""LFME (Xiang, Ding, Han, "Learning From Multiple Experts: Self-paced Knowledge Distillation for Long-tailed
Classification", ECCV 2020; official code xiangly55/LFME): ``centralized.method=lfme``.

Stage 1 (``centralized.epochs``): one expert per class group (many/medium/few of
:func:`fedlt.metrics.class_groups`), each the configured model with a head over its group's classes only,
trained with CE on the training samples of its group (labels renumbered within the group) — the official
``main.py --config=config/ImageNet_LT/{many,median,low}_shot.py`` (``Shot_Dataset``, plain shuffling, cosine lr).
Each stage-1 epoch is one epoch of each expert over its own subset, in batches of ``batch_size``.

Stage 2 (``centralized.stage2_epochs``): the experts frozen, the student (the configured model over all classes)
trained from scratch with :func:`fedlt.losses.lfme.lfme_loss` (``main_LFME.py``, ``run_network_LFME.py``):
class-balanced sampling (the official ``CurricSampler`` is class-aware sampling), self-paced expert weights
λ_g from the student's accuracy on each group before the epoch (0 before the first, as the official
``current_acc_top1``) against the expert's, and curriculum instance weights from the experts' confidence.

Departures from the official code, each forced or said: accuracies are class-mean accuracies on the training set
(the official uses its validation split, fedlt has none; on the balanced ImageNet-LT val micro = class mean);
the groups are fedlt's (many > 100, few < 20; the official ≥ 100, ≤ 20). The student's optimizer is stage 2's
(``stage2_lr``, the ``stage2_*`` keys of :class:`~fedlt.options.Stage2Options`; cosine by default). The official
ImageNet-LT student (``config/ImageNet_LT/LFME.py``: 90 epochs, batch 256, MultiStepLR [50, 80] × 0.1, stepped at
the top of each epoch from 1, so each decay lands one epoch early) is ``stage2_epochs=90 stage2_batch_size=256
stage2_schedule=step stage2_milestones=[49,79]``. The official keeps each expert's and the student's best epoch
(``state_dict_best``); fedlt the last.

The evaluated model is the student: the rows of stage 1 repeat the initial model's metrics.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment, model_for
from fedlt.losses.lfme import (
    curriculum_weights,
    group_thresholds,
    lfme_loss,
    scheduled_instance_weight,
    self_paced_weight,
)
from fedlt.metrics import class_groups, per_class_accuracy
from fedlt.models.base import build_model
from fedlt.options import CentralizedOptions, Stage2Options
from fedlt.registry import CENTRALIZED
from fedlt.samplers import make_sampler
from fedlt.streams import Stream, seeded_rng
from fedlt.train import Augment, OptimConfig, Sampler, TensorData, TrainResult, predict_logits, train


class LFMEModel(nn.Module):
    """The student (``forward``: logits over all classes) and one expert per class group; ``groups[g]`` are
    expert g's classes in its output order. After :meth:`freeze_experts` the experts take no gradient and
    stay in eval mode (BatchNorm statistics fixed), as the official ``requires_grad = False`` teachers."""

    def __init__(self, student: nn.Module, experts: list[nn.Module], groups: list[list[int]]) -> None:
        super().__init__()
        self.student = student
        self.experts = nn.ModuleList(experts)
        self.groups = [torch.as_tensor(g, dtype=torch.long) for g in groups]
        self.experts_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    @torch.no_grad()
    def expert_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [expert(x) for expert in self.experts]

    def freeze_experts(self) -> None:
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.experts_frozen = True
        self.experts.eval()

    def train(self, mode: bool = True) -> "LFMEModel":
        super().train(mode)
        if self.experts_frozen:
            self.experts.eval()
        return self


def lfme_groups(train_counts: np.ndarray) -> list[list[int]]:
    """The class groups of the experts (many, medium, few of :func:`fedlt.metrics.class_groups`)."""
    group_of, _ = class_groups(train_counts)
    return [np.flatnonzero(group_of == g).tolist() for g in range(3) if (group_of == g).any()]


def with_experts(cfg: Config, student: nn.Module, in_channels: int, groups: list[list[int]]) -> LFMEModel:
    """``student`` and one expert per group (the configured model, a head over the group's classes), each
    expert initialised from its own seed (``Stream.INIT``, ``Stream.METHOD``, g)."""
    kw = cfg.model.model_dump(exclude={"name"})
    experts = []
    for g, cls in enumerate(groups):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeded_rng(cfg.seed, Stream.INIT, Stream.METHOD, g).integers(2**31)))
            experts.append(build_model(cfg.model.name, len(cls), in_channels, **kw))
    return LFMEModel(student, experts, groups)


def build_lfme_model(cfg: Config, exp: Experiment, groups: list[list[int]]) -> LFMEModel:
    """The student (``model_for``) with the group experts (:func:`with_experts`)."""
    return with_experts(cfg, model_for(cfg, exp), exp.in_channels, groups)


def group_data(data: TensorData, cls: list[int] | torch.Tensor) -> tuple[TensorData, torch.Tensor]:
    """The samples of classes ``cls`` with labels renumbered 0..|cls|−1 in ``cls``'s order (``Shot_Dataset``),
    and their indices in ``data``."""
    cls = torch.as_tensor(cls, dtype=torch.long, device=data.labels.device)
    position = torch.full((data.num_classes,), -1, dtype=torch.long, device=data.labels.device)
    position[cls] = torch.arange(len(cls), device=data.labels.device)
    idx = torch.nonzero(position[data.labels] >= 0).flatten()
    return TensorData(data.images[idx], position[data.labels[idx]], data.mean, data.std, len(cls)), idx


def expert_statistics(model: LFMEModel, data: TensorData, thresholds: np.ndarray,
                      batch_size: int = 1024) -> tuple[list[float], np.ndarray]:
    """Each expert's class-mean accuracy on its group's (un-augmented) samples, and every sample's curriculum
    weight w_i from its expert's confidence in its label (``eval_instance_hardness``)."""
    confidence = np.zeros(len(data))
    accuracy = []
    for expert, cls in zip(model.experts, model.groups):
        sub, idx = group_data(data, cls)
        logits = predict_logits(expert, sub, batch_size)
        labels = sub.labels.cpu()
        accuracy.append(float(np.nanmean(per_class_accuracy(logits.argmax(1).numpy(), labels.numpy(), len(cls)))))
        confidence[idx.cpu().numpy()] = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1).numpy()
    return accuracy, curriculum_weights(confidence, data.labels.cpu().numpy(), thresholds)


def student_group_accuracy(model: nn.Module, data: TensorData, groups: list[torch.Tensor],
                           batch_size: int = 1024) -> list[float]:
    """The student's class-mean accuracy on each group's classes (``shot_acc``), on the un-augmented data."""
    pred = predict_logits(model, data, batch_size).argmax(1).numpy()
    acc = per_class_accuracy(pred, data.labels.cpu().numpy(), data.num_classes)
    return [float(np.nanmean(acc[g.numpy()])) for g in groups]


class RecordedOrder:
    """A sampler that keeps its epoch's order, so the objective can name the samples of its k-th batch
    (:func:`fedlt.train.batch_schedule` cuts the order into consecutive batches of ``batch_size``, dropping only
    a last batch of one). :meth:`next_batch` checks the labels, so a misaligned batch is an error, not a
    silently wrong weight."""

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.order, self.labels, self.k = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0

    def __call__(self, labels: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        self.order, self.labels, self.k = self.sampler(labels, generator, epoch), labels, 0
        return self.order

    def next_batch(self, y: torch.Tensor) -> torch.Tensor:
        idx = self.order[self.k * self.batch_size:(self.k + 1) * self.batch_size]
        self.k += 1
        if len(idx) != len(y) or not torch.equal(self.labels[idx], y.cpu()):
            raise FedLTError("lfme: a training batch does not match its sampler's order (curriculum weights)")
        return idx


@CENTRALIZED.register("lfme")
class LFME(CentralizedMethod):
    """LFME: stage 1 the group experts, stage 2 the student distilled from them (the module docstring)."""

    class Options(CentralizedOptions, Stage2Options):
        stage2_epochs: int = Field(10, ge=0, description="lfme: epochs of the student (stage 2)")
        stage2_lr: float | None = Field(None, gt=0, description="lfme: the student's lr (None: stage 1's)")
        stage2_sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = Field(
            "class_balanced", description="lfme: the student's sampler (official: class-aware)")
        temperature: float = Field(2.0, gt=0, description="lfme: distillation temperature T")
        decay_thresh: float = Field(0.3, ge=0, lt=1, description="lfme: self-paced threshold θ (λ = 1 while "
                                                                  "student acc < θ·expert acc)")
        curriculum: bool = Field(True, description="lfme: curriculum instance weights on the student's logits")

    two_stage = True

    def __init__(self, cfg: Config, train_counts: np.ndarray) -> None:
        super().__init__(cfg, train_counts)
        self.groups = lfme_groups(train_counts)
        group_of = np.zeros(self.num_classes, dtype=int)
        for g, cls in enumerate(self.groups):
            group_of[cls] = g
        self.thresholds = group_thresholds(train_counts, group_of)
        self.expert_accuracy: list[float] | None = None
        self.instance_weights: torch.Tensor | None = None
        self.order: RecordedOrder | None = None
        self.last: dict = {}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.centralized.sam != "none":
            raise FedLTError("centralized.method=lfme trains its experts and student itself: set centralized.sam=none")
        if cfg.centralized.pretrain != "none":
            raise FedLTError("centralized.method=lfme has no pre-training stage (its experts and student start from "
                             "scratch, as the official): set centralized.pretrain=none")
        if cfg.centralized.stage2_epochs == 0:
            raise FedLTError("centralized.method=lfme distils its student in stage 2: centralized.stage2_epochs=0 "
                             "would report the untrained student; give at least 1")

    def build_model(self, exp: Experiment) -> nn.Module:
        return build_lfme_model(self.cfg, exp, self.groups)

    def stage2_epochs(self) -> int:
        return self.opts.stage2_epochs

    def start_stage2(self, model: nn.Module) -> None:
        model.freeze_experts()

    def train_epoch(self, stage: int, model: nn.Module, data: TensorData, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, opt: OptimConfig, augment: Augment | None,
                    epoch: int) -> TrainResult:
        if stage == 1:
            return self.train_experts(model, data, optimizer, generator, opt, augment, epoch)
        return self.train_student(model, data, optimizer, generator, opt, augment, epoch)

    def train_experts(self, model: LFMEModel, data: TensorData, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator, opt: OptimConfig, augment: Augment | None,
                      epoch: int) -> TrainResult:
        """One epoch of each expert on its group's samples (the optimizer holds every parameter; only the
        trained expert's get gradients, so SGD leaves the others untouched)."""
        loss, seen, steps = 0.0, 0, 0
        for expert, cls in zip(model.experts, model.groups):
            sub, _ = group_data(data, cls)
            r = train(expert, sub, opt=opt, epochs=min(1.0, self.epochs - epoch), generator=generator,
                      augment=augment, sampler=self.sampler(), optimizer=optimizer, start_epoch=epoch,
                      total_epochs=self.epochs)
            loss, seen, steps = loss + r.loss * r.num_examples, seen + r.num_examples, steps + r.steps
        return TrainResult(loss=loss / max(seen, 1), num_examples=seen, steps=steps)

    def distill_weights(self, model: LFMEModel, data: TensorData, epoch: int) -> list[float]:
        """λ_g from the student's group accuracies before epoch ``epoch`` (0 before the first)."""
        student = student_group_accuracy(model, data, model.groups) if epoch > 0 else [0.0] * len(model.groups)
        self.last = {"student_accuracy": student, "expert_accuracy": self.expert_accuracy}
        return [self_paced_weight(a, e, self.opts.decay_thresh) for a, e in zip(student, self.expert_accuracy)]

    def train_student(self, model: LFMEModel, data: TensorData, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator, opt: OptimConfig, augment: Augment | None,
                      epoch: int) -> TrainResult:
        if self.expert_accuracy is None:  # here, not in start_stage2: a resumed run loads the experts after it
            self.expert_accuracy, w = expert_statistics(model, data, self.thresholds)
            self.instance_weights = torch.as_tensor(w, dtype=torch.float32)
            self.order = RecordedOrder(make_sampler(self.opts.stage2_sampler, self.stage2_epochs()), opt.batch_size)
        lambdas = self.distill_weights(model, data, epoch)
        v = scheduled_instance_weight(self.instance_weights, epoch + 1, self.stage2_epochs())
        groups, order, temperature, curriculum = model.groups, self.order, self.opts.temperature, self.opts.curriculum

        def objective(m: LFMEModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            weights = v[order.next_batch(y)] if curriculum else None
            return lfme_loss(m(x), m.expert_logits(x), groups, y, weights, lambdas, temperature)

        return train(model, data, objective, opt=opt, epochs=1.0, generator=generator, augment=augment,
                     sampler=order, optimizer=optimizer, start_epoch=epoch, total_epochs=self.stage2_epochs())
