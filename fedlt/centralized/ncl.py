"""NCL (Li et al., "Nested Collaborative Learning for Long-Tailed Visual Recognition", CVPR 2022;
Bazinga699/NCL): M experts trained together with nested individual learning and nested balanced online
distillation over hard category mining (:mod:`fedlt.losses.ncl`), and the self-supervised feature enhancement,
a MoCo contrastive term per expert. Test: the mean of the experts' raw logits (``multi_network_valid_model_final``).

Follows the official CIFAR configs ``config/CIFAR/CIFAR100/cifar100_im100_NCL.yaml`` and
``..._NCL_with_contrastive.yaml`` (the method's full form, the default here): 3 experts, each a whole ResNet-32
(``MULTI_NETWORK_TYPE: [res32_cifar] × 3``, no shared layer: ``shared_stem=false``, 16/32/64 channels) with a
linear classifier with bias (``CLASSIFIER.TYPE: FC``, PyTorch's default initialisation, the Kaiming-normal
initialisation of ``resnet_cifar.py`` being for the backbone only); every expert sees the same image, crop/flip +
AutoAugment (CIFAR policy) + Cutout(16) (``aug_plus``); λ = λ_h = 0.6, CE and HCM ratios 1, 30 hard categories
of CIFAR-100's 100 (here ``hard_categories``, default 30 % of the classes: the repository has no CIFAR-10
config, so the 3 of 10 is that proportion, not a published constant).

Contrastive part (``lib/net/network.py`` ``multi_Network_MOCO``, ``lib/net/MOCO.py``, ``lib/core/function.py``,
``combiner.multi_network_default_CON``), per expert m: the query is an MLP projection (d → d → ReLU → 64, with
bias; ``model.projections[m]``) of expert m's feature of the training view; the key is a momentum copy of
expert m's feature extractor on a second view, through its own MLP; loss CE over [q·k, q·queue]/T with T = 0.2,
a queue of K = 1024 unit keys (initially random), weight ``CON_RATIO`` = 1. Kept from the official code: the
momentum copy starts from its own random initialisation (not a copy of the query networks), only its feature
extractor follows θ_k ← m·θ_k + (1 − m)·θ_q with m = 0.999 (after the key forward pass, before the step), and
its MLP stays at its random initialisation (``classifier_MA`` is detached and never updated). The official
update sits in a ``for net_id in range(network_num)`` loop whose body updates every expert's parameters, so
each step applies it M times: θ_k ← m^M·θ_k + (1 − m^M)·θ_q (0.997 for M = 3), as here.

The key view is the official SimCLR-style view (``augmentation_sim_cifar``: RandomResizedCrop(0.2–1), flip,
colour jitter, grayscale, Gaussian blur; :func:`~fedlt.data.augment.simclr_augment`), or with
``key_view=same`` a second draw of the training view (cheaper on a CPU).

Not followed: the single-device batch shuffle of the keys (``shuffle_BN``) is not done (on one device it
leaves BatchNorm's batch statistics unchanged); a last batch shorter than the others wraps around the queue
(the official code asserts K % B = 0). The official ``WarmupMultiStepLR`` (warm-up from lr/3, stepped before
each epoch) is ``centralized.warmup_factor=1/3`` with the milestones one epoch early, as the shipped config
sets them. Nor the official model selection: the epoch with the best test accuracy is kept; fedlt reports the
last.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.experts import ExpertMethod
from fedlt.data.augment import simclr_augment
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment, model_for
from fedlt.losses.ncl import NILNBODOptions, log_counts, moco_loss
from fedlt.models.base import build_model
from fedlt.models.experts import CIFAR_RESNET_EXPERTS, MultiExpertModel
from fedlt.registry import CENTRALIZED
from fedlt.streams import Stream, seeded_rng, torch_generator
from fedlt.train import Augment, Objective, TensorData


class QueryKeyViews:
    """[query; key] views of a batch (2B rows): the training view, and the key view, either the official
    SimCLR view (:func:`~fedlt.data.augment.simclr_augment` on the un-normalised images) or a second draw of
    the training view (``same``)."""

    def __init__(self, query: Augment, key: str, mean: torch.Tensor, std: torch.Tensor, chunk: int) -> None:
        self.query, self.key, self.mean, self.std, self.chunk = query, key, mean, std, chunk

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        q = self.query(x, generator)
        if self.key == "same":
            return torch.cat([q, self.query(x, generator)])
        m = self.mean.to(x.device, x.dtype)[None, :, None, None]
        s = self.std.to(x.device, x.dtype)[None, :, None, None]
        k = (simclr_augment((x * s + m).clamp(0, 1), generator, self.chunk) - m) / s
        return torch.cat([q, k])


def projection_heads(num_experts: int, feature_dim: int, dim: int) -> nn.ModuleList:
    """One MLP per expert, d → d → ReLU → ``dim`` with biases (the official ``SEMI_TYPE: mlp``)."""
    return nn.ModuleList(nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                       nn.Linear(feature_dim, dim)) for _ in range(num_experts))


@CENTRALIZED.register("ncl")
class NCL(ExpertMethod):
    """NCL: NIL + NBOD over hard categories, + a MoCo term per expert (``contrastive``). Defaults: the
    official ``cifar100_im100_NCL_with_contrastive.yaml``; see the module docstring."""

    class Options(ExpertMethod.Options, NILNBODOptions):
        reduce_dimension: bool = Field(False, description="resnet32_experts: experts of 24/48 channels (else 32/64)")
        num_experts: int = Field(3, gt=0, description="number of experts M")
        classifier: Literal["linear", "cosine"] = Field("linear", description="each expert's classifier")
        shared_stem: bool = Field(False, description="share the experts' first layers (official: M whole networks)")
        autoaugment: bool = Field(True, description="add AutoAugment (CIFAR policy) + Cutout to crop/flip")
        contrastive: bool = Field(True, description="add the MoCo self-supervised term per expert")
        key_view: Literal["simclr", "same"] = Field("simclr", description="the MoCo key's view: the official "
                                                    "SimCLR view, or a second draw of the training view")
        contrastive_weight: float = Field(1.0, ge=0, description="CON_RATIO, weight of the MoCo term")
        moco_dim: int = Field(64, gt=0, description="width of the MoCo projection")
        queue_size: int = Field(1024, gt=0, description="K, keys in each expert's MoCo queue")
        moco_temperature: float = Field(0.2, gt=0, description="T of the MoCo logits")
        key_momentum: float = Field(0.999, ge=0, lt=1, description="m of the momentum key encoder, in [0, 1)")

    def __init__(self, cfg, train_counts) -> None:
        super().__init__(cfg, train_counts)
        self.opts.check_hard_categories(len(self.class_counts), "centralized")
        self.log_n = log_counts(self.class_counts)
        self.generator = torch_generator(cfg.seed, Stream.CENTRAL, Stream.METHOD)
        self.key_model: MultiExpertModel | None = None
        self.queues: torch.Tensor | None = None  # (M, K, d) unit keys
        self.pointer = 0
        self.pending_keys: dict | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.centralized.sam != "none":
            raise FedLTError("centralized.sam=cc_sam perturbs one classifier on model(x); centralized.method=ncl "
                             "trains every expert's classifier and projection: set centralized.sam=none")

    def num_experts(self) -> int:
        return self.opts.num_experts

    def model_options(self) -> dict:
        o, extra = self.opts, {}
        name = self.expert_model(self.cfg)
        if name in CIFAR_RESNET_EXPERTS:
            extra["widths"] = (16, 24, 48) if o.reduce_dimension else (16, 32, 64)
        return dict(classifier=o.classifier, scale=o.expert_scale, num_experts=o.num_experts,
                    shared_stem=o.shared_stem, **extra)

    def build_model(self, exp: Experiment) -> nn.Module:
        name = self.expert_model(self.cfg)
        model = model_for(self.cfg, exp, name, **self.model_options())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeded_rng(self.cfg.seed, Stream.INIT, Stream.METHOD).integers(2**31)))
            for expert in model.experts:  # resnet32_experts draws Kaiming-normal heads; the official FC keeps
                if name in CIFAR_RESNET_EXPERTS and isinstance(expert.classifier, nn.Linear):  # nn.Linear's own
                    expert.classifier.reset_parameters()
            if self.opts.contrastive:
                model.projections = projection_heads(self.opts.num_experts, model.feature_dim, self.opts.moco_dim)
                # the official momentum encoder and its MLPs: a model of their own random initialisation
                key = build_model(name, exp.num_classes, exp.in_channels,
                                  **{**self.cfg.model.model_dump(exclude={"name"}), **self.model_options()})
                key.projections = projection_heads(self.opts.num_experts, key.feature_dim, self.opts.moco_dim)
        if self.opts.contrastive:
            key.requires_grad_(False)
            if self.pending_keys is not None:
                key.load_state_dict(self.pending_keys)
            self.key_model = key
        return model

    def augment(self, data: TensorData) -> Augment:
        view = super().augment(data)
        if not self.opts.contrastive:
            return view
        return QueryKeyViews(view, self.opts.key_view, data.mean, data.std, self.opts.augment_chunk)

    def objective(self, epoch: int) -> Objective:
        o = self.opts

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            b = len(y)
            s = model.stem(x[:b])
            feats = [e.features(s) for e in model.experts]
            z = torch.stack([e.classifier(h) for e, h in zip(model.experts, feats)])
            loss = o.nil_nbod(z, y, self.log_n)
            if not o.contrastive:
                return loss
            keys = self.momentum_keys(model, x[b:])
            con = sum(moco_loss(model.projections[m](h), keys[m], self.queues[m], o.moco_temperature)
                      for m, h in enumerate(feats))
            self.enqueue(keys)
            return loss + o.contrastive_weight * con
        return objective

    @torch.no_grad()
    def momentum_keys(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(M, B, d) keys of the momentum encoder on the second view, then θ_k ← m^M·θ_k + (1 − m^M)·θ_q on the
        feature extractors (stem + each expert's features; not the classifiers, not the key MLPs)."""
        key = self.key_model.to(x.device)
        key.train(model.training)
        if self.queues is None:
            q = torch.randn(self.opts.num_experts, self.opts.queue_size, self.opts.moco_dim, generator=self.generator)
            self.queues = torch.nn.functional.normalize(q, dim=2)
        self.queues = self.queues.to(x.device)
        s = key.stem(x)
        keys = torch.stack([p(e.features(s)).float() for e, p in zip(key.experts, key.projections)])
        pairs = [(key.stem, model.stem)] + [(k.features, q.features) for k, q in zip(key.experts, model.experts)]
        m = self.opts.key_momentum ** self.opts.num_experts  # the official update runs once per expert (see above)
        for k_part, q_part in pairs:
            for pk, pq in zip(k_part.parameters(), q_part.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        return keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the normalised keys at the queue pointer (wrapping around), advance it by B."""
        size = self.opts.queue_size
        slots = (self.pointer + torch.arange(keys.shape[1], device=keys.device)) % size
        self.queues[:, slots] = torch.nn.functional.normalize(keys, dim=2)
        self.pointer = (self.pointer + keys.shape[1]) % size

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state(), "queues": self.queues,
                "pointer": self.pointer, "key_model": None if self.key_model is None else self.key_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
            self.queues, self.pointer = state["queues"], state["pointer"]
            if state["key_model"] is not None:
                if self.key_model is not None:
                    self.key_model.load_state_dict(state["key_model"])
                else:
                    self.pending_keys = state["key_model"]
