"""SBCL (Hou et al., "Subclass-balancing Contrastive Learning for Long-tailed Recognition", ICCV 2023; follows
JackHck/SBCL ``SimCLR/main.py`` (CIFAR stage 1), ``SimCLR/resnet.py`` and ``SimCLR/linear_classify.py``
(stage 2)); the formulas are in :mod:`fedlt.losses.sbcl`.

Stage 1 (``epochs``) trains features + an MLP projection (d → d → ReLU → ``feat_dim``, normalised) on two
views of every image: SupCon on the classes for the first ``supcon_epochs`` (the official warm-up epochs),
then the subclass-balancing loss. The subclasses and the class temperatures are recomputed at the start of
every epoch e ≥ ``supcon_epochs`` with e % ``cluster_step`` = 0 (the official ``epoch % step == 0``; fedlt also
clusters at the first epoch after the warm-up when that is not a multiple of the step, where the official code
would train without subclasses), from the projections of one crop/flip view of every training image in eval
mode. Stage 2 (``stage2_epochs``) trains a cosine classifier (s = 30) on the frozen features with LDAM and
class-balanced weights (β = 0.9999) from its first epoch (``linear_classify.py --train_rule DRW`` sets
``idx = 1``) and instance-balanced batches; test logits are s·cos. Its optimizer is the ``stage2_*`` keys
(:class:`~fedlt.options.Stage2Options`); ``linear_classify.py``'s ``adjust_learning_rate`` (batch 128, wd 0,
lr·(e+1)/5 for epochs e < 5, ×0.1 from e = 140, ×0.01 from e = 180) is ``stage2_batch_size=128
stage2_weight_decay=0 stage2_warmup_epochs=5 stage2_schedule=step stage2_milestones=[140,180]``, as the shipped
config sets. Its ``elif epoch > 190`` (×0.001) branch comes after ``epoch > 180`` and is never taken: not copied.

With ``queue_size`` > 0 the stage follows the official MoCo form instead (``moco/moco.py``, ``moco/loss.py``,
``moco/main.py``, used there for ImageNet-LT): the keys of view 2 come from a momentum copy of features +
projection (θ_k ← m·θ_k + (1 − m)·θ_q before each step), the loss contrasts each query with its key and a
queue of the last ``queue_size`` keys with their classes and subclasses (:func:`~fedlt.losses.sbcl.sbcl_queue_loss`,
constant ranking temperature τ_r; KCL with 6 drawn positives as the warm-up), and the clustering reads the
momentum encoder's projections. The official batch shuffle across GPUs (a DDP device for BatchNorm) has no
single-device counterpart and is not done; a last batch shorter than the others wraps around the queue (the
official code asserts that it never happens).

Not followed: the official SimCLR augmentation (RandomResizedCrop(0.2–1), colour jitter, grayscale) — fedlt's
views are crop/flip (+ ``autoaugment``); the official model selection (the best test epoch) — fedlt reports the
last.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.centralized.decoupled import DecoupledMethod, FrozenFeatures
from fedlt.centralized.glmc import TwoCrops
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment, model_for
from fedlt.losses import loss_objective
from fedlt.losses.sbcl import (
    SBCLContrastOptions,
    class_temperatures,
    cosine_kmeans,
    kcl_loss,
    sbcl_loss,
    sbcl_queue_loss,
    subclass_numbers,
    supcon_loss,
)
from fedlt.models.base import NormedLinear
from fedlt.models.experts import require_single_network
from fedlt.registry import CENTRALIZED, LOSSES
from fedlt.samplers import make_sampler
from fedlt.streams import Stream, seeded_rng, torch_generator
from fedlt.train import Augment, Objective, Sampler, TensorData, prepare_batch


class SBCLModel(nn.Module):
    """features → h; ``forward`` = classifier(h); :meth:`project` = normalise(W₂·ReLU(W₁·h)) (``SupConResNet``)."""

    def __init__(self, base: nn.Module, feat_dim: int = 128) -> None:
        super().__init__()
        d = base.feature_dim
        self.features, self.classifier, self.feature_dim = base.features, base.classifier, d
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, feat_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)).float(), dim=1)


class RecordingSampler:
    """A sampler that keeps the order it gave, so the objective can tell which samples a batch holds."""

    def __init__(self, inner: Sampler) -> None:
        self.inner, self.order = inner, torch.empty(0, dtype=torch.long)

    def __call__(self, labels: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        self.order = self.inner(labels, generator, epoch)
        return self.order


@CENTRALIZED.register("sbcl")
class SBCL(DecoupledMethod):
    """SBCL: subclass-balancing contrastive stage 1 (clustering, class temperatures), LDAM-DRW linear stage 2.
    Defaults: the official CIFAR command (T = 0.1, cluster low 10, step 10, 10 warm-up epochs, feat 128)."""

    class Options(SBCLContrastOptions, DecoupledMethod.Options):  # SBCL's γ before the schedule's gamma
        cluster_step: int = Field(10, gt=0, description="re-cluster every this many epochs")
        supcon_epochs: int = Field(10, ge=0, description="epochs of plain SupCon before the first clustering")
        stage2_epochs: int = Field(200, ge=0, description="LDAM-DRW classifier epochs on the frozen features")
        stage2_sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = Field(
            "instance", description="sampler of stage 2")
        s: float = Field(30.0, gt=0, description="LDAM scale s of stage 2")
        max_margin: float = Field(0.5, gt=0, description="LDAM's largest margin of stage 2")
        queue_size: int = Field(0, ge=0, description="MoCo queue of past keys (0: in-batch, the CIFAR form)")
        key_momentum: float = Field(0.999, ge=0, lt=1, description="m of the momentum key encoder (queue), in [0, 1)")
        ranking_temperature: float = Field(0.12, gt=0, description="τ_r of the class term with a queue")
        kcl_positives: int = Field(6, ge=0, description="KCL warm-up: positives drawn per anchor (queue)")
        gamma_is_decay: ClassVar[bool] = False  # centralized.gamma is SBCL's γ

        def unused(self, cfg, section: str) -> list[str]:
            out = super().unused(cfg, section)
            if self.supcon_epochs >= self.epochs:
                out.append(f"{section}.supcon_epochs={self.supcon_epochs} ≥ {section}.epochs={self.epochs:g}: "
                           f"stage 1 ends before the first clustering (plain SupCon throughout)")
            return out

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "centralized.method=sbcl adds its projection to a single-head model")
        if cfg.centralized.schedule == "step":  # the schedule's decay factor is centralized.gamma, here SBCL's γ
            raise FedLTError(f"centralized.method=sbcl takes centralized.gamma as its class-term weight γ "
                             f"({cfg.centralized.gamma:g}), which a step schedule would also take as its lr decay: "
                             f"use centralized.schedule=cosine, cosine_epoch or constant")
        super().check_config(cfg)

    def __init__(self, cfg, train_counts) -> None:
        super().__init__(cfg, train_counts)
        if (np.asarray(train_counts) == 0).any():
            raise FedLTError("sbcl needs every class in the training set (it clusters each class)")
        self.numbers = subclass_numbers(train_counts, self.opts.cluster)
        self.generator = torch_generator(cfg.seed, Stream.CENTRAL, Stream.METHOD)
        self.recorder = RecordingSampler(make_sampler(self.opts.sampler, self.epochs))
        self.subclasses: torch.Tensor | None = None  # per training sample
        self.class_tau: torch.Tensor | None = None
        self.in_stage2 = False
        self.key_model: SBCLModel | None = None  # the momentum encoder of the queue form
        self.queue: dict[str, torch.Tensor] | None = None
        self.pending_keys: dict | None = None  # key encoder state of a resumed run, loaded at its creation

    def build_model(self, exp: Experiment) -> nn.Module:
        base = model_for(self.cfg, exp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeded_rng(self.cfg.seed, Stream.INIT, Stream.METHOD).integers(2**31)))
            return SBCLModel(base, self.opts.feat_dim)

    def augment(self, data: TensorData) -> Augment:
        self.data, self.views = data, TwoCrops(super().augment(data))
        return self.views

    def sampler(self) -> Sampler:
        return self.recorder

    def clustering_due(self, epoch: int) -> bool:
        o = self.opts
        return epoch >= o.supcon_epochs and (epoch % o.cluster_step == 0 or self.subclasses is None)

    @torch.no_grad()
    def cluster(self, model: SBCLModel) -> None:
        """Subclass ids and class temperatures from the projections of one crop/flip view of every image."""
        was_training = model.training
        model.eval()
        feats = []
        for start in range(0, len(self.data), 1024):
            idx = torch.arange(start, min(start + 1024, len(self.data)))
            x, _ = prepare_batch(self.data, idx, self.views.view, self.generator)
            feats.append((self.key_model or model).project(x).float())
        model.train(was_training)
        f, labels = torch.cat(feats), self.data.labels
        subclasses = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
        offset = 0
        for c, k in enumerate(self.numbers):
            members = (labels == c).nonzero().squeeze(1)
            if k > 1:
                subclasses[members] = cosine_kmeans(f[members], k, self.rng, iter_limit=self.opts.kmeans_iters) + offset
            else:
                subclasses[members] = offset
            offset += k
        self.subclasses = subclasses
        self.class_tau = class_temperatures(f, labels, self.numbers, self.opts.temperature)

    def objective(self, epoch: int) -> Objective:
        o, state = self.opts, {"cursor": 0, "checked": self.clustering_due(epoch) is False}

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if o.queue_size:
                self.ensure_queue(model, x.device)
            if not state["checked"]:
                self.cluster(model)
                state["checked"] = True
            b = len(y)
            warm = epoch < o.supcon_epochs or self.subclasses is None
            sub = None
            if not warm:
                idx = self.recorder.order[state["cursor"]:state["cursor"] + b].to(y.device)
                state["cursor"] += b
                if not torch.equal(self.data.labels[idx], y):
                    raise FedLTError("sbcl lost track of the batch order (its sampler and the trainer disagree)")
                sub = self.subclasses[idx]
            if o.queue_size:
                return self.queue_loss(model, x, y, sub)
            f = model.project(x)
            if warm:
                return supcon_loss(f, y, o.temperature, o.temperature)
            return sbcl_loss(f, y, sub, self.class_tau, o.temperature, o.base_temperature, o.gamma)
        return objective

    # --- the MoCo-queue form ---
    def ensure_queue(self, model: SBCLModel, device: torch.device) -> None:
        """The momentum encoder (a copy of the model) and a queue of random unit keys of class/subclass −1."""
        if self.key_model is None:
            self.key_model = copy.deepcopy(model)
            for p in self.key_model.parameters():
                p.requires_grad_(False)
            if self.pending_keys is not None:
                self.key_model.load_state_dict(self.pending_keys)
        if self.queue is None:
            keys = torch.randn(self.opts.queue_size, self.opts.feat_dim, generator=self.generator)
            empty = torch.full((self.opts.queue_size,), -1, dtype=torch.long)
            self.queue = {"keys": F.normalize(keys, dim=1), "labels": empty, "subclasses": empty.clone(),
                          "ptr": torch.zeros((), dtype=torch.long)}
        self.queue = {k: v.to(device) for k, v in self.queue.items()}

    def queue_loss(self, model: SBCLModel, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor | None) -> torch.Tensor:
        o, b, qu = self.opts, len(y), self.queue
        q = model.project(x[:b])
        with torch.no_grad():
            for pk, pq in zip(self.key_model.parameters(), model.parameters()):
                pk.mul_(o.key_momentum).add_(pq.detach(), alpha=1 - o.key_momentum)
            k = self.key_model.project(x[b:])
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ qu["keys"].clone().T], 1)
        if sub is None:
            loss = kcl_loss(logits, y, qu["labels"], o.kcl_positives, self.generator, o.temperature)
        else:
            loss = sbcl_queue_loss(logits, y, qu["labels"], sub, qu["subclasses"], o.temperature,
                                   o.ranking_temperature, o.gamma)
        slots = (qu["ptr"] + torch.arange(b, device=y.device)) % o.queue_size
        qu["keys"][slots] = k.float()
        qu["labels"][slots] = y
        qu["subclasses"][slots] = sub if sub is not None else -1
        qu["ptr"] = (qu["ptr"] + b) % o.queue_size
        return loss

    # --- stage 2: LDAM-DRW cosine classifier on the frozen features ---
    def start_stage2(self, model: nn.Module) -> None:
        model.features = FrozenFeatures(model.features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeded_rng(self.cfg.seed, Stream.INIT, Stream.METHOD, 2).integers(2**31)))
            model.classifier = NormedLinear(model.feature_dim, self.num_classes)
        self.in_stage2 = True

    def stage2_objective(self, epoch: int) -> Objective:
        return loss_objective(LOSSES.get("ldam")(self.class_counts, max_margin=self.opts.max_margin, s=self.opts.s,
                                                 beta=0.9999))

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.opts.s * logits if self.in_stage2 else logits

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state(), "subclasses": self.subclasses,
                "class_tau": self.class_tau, "queue": self.queue,
                "key_model": None if self.key_model is None else self.key_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
            self.subclasses, self.class_tau = state["subclasses"], state["class_tau"]
            self.queue, self.pending_keys = state["queue"], state["key_model"]

