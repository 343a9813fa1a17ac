"""SBCL client: SBCL's supervised contrastive stage (Hou et al., "Subclass-balancing Contrastive Learning for
Long-tailed Recognition", ICCV 2023; JackHck/SBCL ``SimCLR/main.py``, ``SimCLR/loss.py``, the formulas in
:mod:`fedlt.losses.sbcl`) as the local objective of every client, in its in-batch (CIFAR) form, with its
classifier trained beside it, under any strategy.

A round of client k (round r of R = ``federation.rounds``):

1. Warm-up rounds r ≤ W = round(``supcon_fraction`` · R) (the official 10 warm-up epochs of 200: 0.05) train
   plain SupCon on the classes, as ``centralized.method=sbcl``'s first ``supcon_epochs``.
2. Later rounds first cluster the CLIENT's own data, with the received global model in eval mode: the
   projections of one crop/flip view of each of the client's images; class c of the client is split into
   K_c = max(⌊n_{k,c} / max(min n_k, L)⌋, 1) subclasses by cosine k-means (min over the classes the client
   holds; a class it lacks has no subclass) and the class temperatures τ_c are those of the client's
   projections (percentiles over its classes; τ = T for a class it lacks, never used). No other client's data
   or features enter; every round re-clusters (the official ``cluster_step`` of epochs has no counterpart:
   the features change with every aggregation). The round then trains the bi-granularity loss
   (:func:`~fedlt.losses.sbcl.sbcl_loss`) on the two views of each batch.
3. Its classifier: SBCL's stage 2 is an LDAM-DRW cosine classifier (s = 30, class-balanced β = 0.9999 from its
   first epoch) on frozen features. One client of one round has no second stage, so the classifier is trained in
   the same steps on the detached features of the first view (the features get no gradient from it, as when
   frozen), with the client's counts (absent class = 1: the largest margin).

L = L_SBCL (or L_SupCon) + LDAM-DRW(classifier(sg(h₁)), y). :meth:`SBCLClient.adapt_model` builds
:class:`~fedlt.centralized.sbcl.SBCLModel` (projection d → d → ReLU → ``feat_dim``) with a cosine classifier of
scale s, so the server evaluates s·cos, the centralized method's test logits. The subclass of each sample
travels as its training label (:meth:`SBCLClient.fit` trains on the client's data labelled by subclass and maps
subclass → class in the loss), so the instance-balanced batches need no bookkeeping. Not federated: the MoCo
queue form (``centralized.queue_size``), whose momentum encoder and queue a client of one round does not keep.
Random draws: the clustering view from the torch generator ``(seed, Stream.CLIENT, round, client, 1)``, the
k-means starts from the numpy generator ``(seed, Stream.CLIENT, round, client, 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.centralized.glmc import TwoCrops
from fedlt.centralized.sbcl import SBCLModel
from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.losses.ldam import make_ldam_loss
from fedlt.losses.sbcl import (
    SBCLContrastOptions,
    class_temperatures,
    cosine_kmeans,
    sbcl_loss,
    subclass_numbers,
    supcon_loss,
)
from fedlt.models.base import NormedLinear
from fedlt.models.experts import require_single_network
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, seeded_rng, torch_generator
from fedlt.train import Augment, Objective, TensorData, instance_balanced_sampler, prepare_batch, train


@dataclass
class Subclasses:
    """A client's clustering: the subclass of each sample, the class of each subclass, the class temperatures."""

    of_sample: torch.Tensor
    classes: torch.Tensor
    class_tau: torch.Tensor


@torch.no_grad()
def cluster_client(model: SBCLModel, data: TensorData, view: Augment, cluster: int, temperature: float,
                   kmeans_iters: int, generator: torch.Generator, rng: np.random.Generator) -> Subclasses:
    """Subclasses of the client's classes from the projections of one ``view`` of each of its images (eval mode),
    as :meth:`fedlt.centralized.sbcl.SBCL.cluster` over the classes the client holds."""
    was_training = model.training
    model.eval()
    feats = []
    for start in range(0, len(data), 1024):
        x, _ = prepare_batch(data, torch.arange(start, min(start + 1024, len(data))), view, generator)
        feats.append(model.project(x).float())
    model.train(was_training)
    f, labels = torch.cat(feats), data.labels
    present = data.class_counts.nonzero().squeeze(1).tolist()
    numbers = subclass_numbers(data.class_counts[present], cluster)
    of_sample = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
    classes, offset = [], 0
    for c, k in zip(present, numbers):
        members = (labels == c).nonzero().squeeze(1)
        of_sample[members] = (cosine_kmeans(f[members], k, rng, iter_limit=kmeans_iters) if k > 1 else 0) + offset
        classes += [c] * k
        offset += k
    local = torch.searchsorted(torch.tensor(present, device=labels.device), labels)  # class → index among present
    tau = torch.full((data.num_classes,), float(temperature))
    tau[present] = class_temperatures(f, local, numbers, temperature)
    return Subclasses(of_sample, torch.tensor(classes, device=labels.device), tau)


@CLIENTS.register("sbcl")
class SBCLClient(ClientMethod):
    replaced_head = "a normed linear classifier without bias"

    class Options(ClientMethod.Options, SBCLContrastOptions):
        supcon_fraction: float = Field(0.05, ge=0, le=1, description="fraction of the rounds of plain SupCon "
                                       "(official: 10 warm-up epochs of 200)")
        s: float = Field(30.0, gt=0, description="scale of the cosine classifier (LDAM's s)")
        max_margin: float = Field(0.5, gt=0, description="LDAM's largest margin")
        beta: float = Field(0.9999, ge=0, lt=1, description="β of LDAM's class-balanced weights (DRW from round 1)")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method sbcl adds its projection to a single-head model")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        model.classifier = NormedLinear(model.feature_dim, num_classes, cfg.client.s)
        return SBCLModel(model, cfg.client.feat_dim)

    def warm(self, config: dict) -> bool:
        """Round r is a SupCon warm-up round when r ≤ W = round(supcon_fraction · federation.rounds)."""
        return int(config.get("server-round", 1)) <= round(self.opts.supcon_fraction * self.cfg.federation.rounds)

    def streams(self, config: dict) -> tuple[torch.Generator, np.random.Generator]:
        key = (int(config.get("server-round", 1)), int(config.get("partition-id", 0)))
        return (torch_generator(self.cfg.seed, Stream.CLIENT, *key, 1),
                seeded_rng(self.cfg.seed, Stream.CLIENT, *key, 2))

    def subclasses(self, model: nn.Module, data: TensorData, config: dict, view: Augment) -> Subclasses | None:
        """This round's clustering of the client's data (None in a warm-up round)."""
        if not isinstance(model, SBCLModel):
            raise TypeError("the sbcl client needs the model its adapt_model builds (SBCLModel)")
        if self.warm(config):
            return None
        o = self.opts
        return cluster_client(model, data, view, o.cluster, o.temperature, o.kmeans_iters, *self.streams(config))

    def round_objective(self, data: TensorData, groups: Subclasses | None) -> Objective:
        """L on a batch of two views x = [x₁; x₂] whose labels are subclass ids (class ids in a warm-up round)."""
        o = self.opts
        ldam = make_ldam_loss(data.class_counts, o.max_margin, o.s, o.beta)

        def objective(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            b = len(labels)
            y = labels if groups is None else groups.classes[labels]
            h = model.features(x)
            f = F.normalize(model.head(h).float(), dim=1)
            if groups is None:
                contrast = supcon_loss(f, y, o.temperature, o.temperature)
            else:
                contrast = sbcl_loss(f, y, labels, groups.class_tau, o.temperature, o.base_temperature, o.gamma)
            return contrast + ldam(model.classifier(h[:b].detach()) / o.s, y)
        return objective

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """The loss of a batch labelled as :meth:`fit` labels it (by subclass after the warm-up)."""
        from fedlt.experiment import augment_for

        return self.round_objective(data, self.subclasses(model, data, config, augment_for(self.cfg, data)))

    def fit(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
            augment: Augment) -> FitResult:
        """Cluster, then local SGD on two views of instance-balanced batches of the data labelled by subclass."""
        groups = self.subclasses(model, data, config, augment)
        labelled = data if groups is None else TensorData(data.images, groups.of_sample, data.mean, data.std,
                                                          len(groups.classes))
        t = self.cfg.train
        result = train(model, labelled, self.round_objective(data, groups), opt=self.optim(config),
                       generator=generator, augment=TwoCrops(augment),
                       epochs=None if t.local_steps else t.local_epochs, steps=t.local_steps,
                       sampler=instance_balanced_sampler)
        return FitResult(state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                         metrics={"train_loss": result.loss, "num-examples": len(data), "steps": result.steps,
                                  "train-images": result.num_examples})
