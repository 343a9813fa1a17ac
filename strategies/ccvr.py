"""CCVR: classifier calibration with virtual representations (Luo et al., "No Fear of Heterogeneity:
Classifier Calibration for Federated Learning with Non-IID Data", NeurIPS 2021), over any strategy
(``strategy.base``, default FedAvg).

After round T (and every ``every`` rounds when > 0) all K clients send, on the new global model, each class's
feature mean, unbiased covariance and count (query ``feature-stats``; this reveals class counts). The server
pools them into the global per-class Gaussians (:func:`pool_class_stats`), adds ``ridge``·I, draws
``num_virtual`` features for every class from N(μ_c, Σ_c) and re-fits a copy of the global classifier with CE
on them. That classifier is used for evaluation of the weights it was fitted on (the round number is kept and
checkpointed, so a run resumed after its last round still reports the calibrated model); the base strategy's
weights go on unchanged. summary.json gets the metrics before calibration (``ccvr_uncalibrated``).

The authors released no code; fedlt follows the paper's algorithm (the pooling of Eq. 3–4 is tested against
the covariance of the pooled features). Its constants are fedlt's own choices, not the paper's: the same
``num_virtual`` = 200 for every class (a class-balanced re-fit, where the paper sets M_c per data set or in
proportion to N_c), ``ridge`` = 1e-4, and the re-fit's 10 epochs, lr 0.01, momentum 0.9 and batch 64.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field
from torch import nn

from fedlt.client_method import FitResult
from fedlt.config import Config
from fedlt.data.augment import normalize
from fedlt.errors import FedLTError
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.compose import StrategyWrapper, global_model_metrics, with_classifier
from fedlt.federation.queries import QUERIES
from fedlt.federation.records import load_into
from fedlt.models.experts import require_single_network
from fedlt.registry import STRATEGIES
from fedlt.streams import Stream, torch_generator
from fedlt.train import Augment, TensorData


# --------------------------------------------------------------------------- client side: the statistics
@torch.no_grad()
def features_of(model: nn.Module, data: TensorData, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (``model.features``) of every sample, no augmentation, eval mode, float64 on the CPU."""
    model.eval()
    out = [model.features(normalize(data.images[i:i + batch_size], data.mean, data.std)).float()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).cpu().double() if out else torch.empty(0, model.feature_dim, dtype=torch.float64)


def class_feature_stats(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """Per class of CPU features ``h`` (n, d): mean (C, d), unbiased covariance (C, d, d; zero where n < 2)
    and count (C,)."""
    d = h.shape[1]
    mean, cov, count = np.zeros((num_classes, d)), np.zeros((num_classes, d, d)), np.zeros(num_classes)
    for c in range(num_classes):
        hc = h[y == c]
        count[c] = len(hc)
        if len(hc):
            mean[c] = hc.mean(0).numpy()
        if len(hc) > 1:
            centred = hc - hc.mean(0)
            cov[c] = (centred.T @ centred / (len(hc) - 1)).numpy()
    return {"mean": mean, "cov": cov, "count": count}


@QUERIES.register("feature-stats")
def feature_stats(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                  augment: Augment) -> FitResult:
    """The client's answer to CCVR: its per-class feature statistics on the received weights."""
    h = features_of(model, data)
    return FitResult(state={}, metrics={"num-examples": len(data)},
                     extra_arrays={"stats": class_feature_stats(h, data.labels.cpu(), data.num_classes)})


# --------------------------------------------------------------------------- server side: pool, sample, re-fit
def pool_class_stats(means: np.ndarray, covs: np.ndarray, counts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global per-class mean and covariance from clients' (K, C, d) means, (K, C, d, d) unbiased covariances
    and (K, C) counts, with N_c = Σ_k n_kc:

    μ_c = Σ_k (n_kc/N_c)·μ_kc
    Σ_c = Σ_k ((n_kc − 1)/(N_c − 1))·Σ_kc + Σ_k (n_kc/(N_c − 1))·μ_kc μ_kcᵀ − (N_c/(N_c − 1))·μ_c μ_cᵀ

    (CCVR's Eq. 3-4). Classes with N_c = 0 get zeros; with N_c = 1 a zero covariance. Returns (μ, Σ, N)."""
    means, covs, counts = (np.asarray(a, dtype=np.float64) for a in (means, covs, counts))
    _, C, d = means.shape
    total = counts.sum(0)
    mu, cov = np.zeros((C, d)), np.zeros((C, d, d))
    for c in range(C):
        n, N = counts[:, c], total[c]
        if N == 0:
            continue
        mu[c] = (n[:, None] * means[:, c]).sum(0) / N
        if N < 2:
            continue
        held = n > 0
        w_cov = (n[held] - 1) / (N - 1)
        outer = np.einsum("ki,kj->kij", means[held, c], means[held, c])
        cov[c] = (np.tensordot(w_cov, covs[held, c], axes=1) + np.tensordot(n[held] / (N - 1), outer, axes=1)
                  - N / (N - 1) * np.outer(mu[c], mu[c]))
    return mu, cov, total


def sample_virtual(mu: np.ndarray, cov: np.ndarray, counts: np.ndarray, per_class: int, ridge: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` draws from N(μ_c, Σ_c + ridge·I) for every class with N_c > 0 (the same number for every
    class, so the re-fit is class-balanced). Returns (features, labels)."""
    feats, labels = [], []
    for c in np.flatnonzero(np.asarray(counts) > 0):
        sigma = torch.as_tensor(cov[c], dtype=torch.float64)
        sigma = 0.5 * (sigma + sigma.T) + ridge * torch.eye(sigma.shape[0], dtype=torch.float64)
        L = torch.linalg.cholesky(sigma)
        z = torch.randn(per_class, sigma.shape[0], generator=generator, dtype=torch.float64)
        feats.append(torch.as_tensor(mu[c], dtype=torch.float64) + z @ L.T)
        labels.append(torch.full((per_class,), int(c), dtype=torch.long))
    return torch.cat(feats).float(), torch.cat(labels)


def fit_classifier(classifier: nn.Module, feats: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                   batch_size: int, generator: torch.Generator, momentum: float = 0.0) -> nn.Module:
    """Train ``classifier`` (a copy is returned) with CE on (features, labels) by mini-batch SGD (also CReFF's
    re-training on its federated features)."""
    clf = copy.deepcopy(classifier).float().train()
    for p in clf.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(clf(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


# --------------------------------------------------------------------------- the wrapper
@STRATEGIES.register("ccvr")
class CCVR(StrategyWrapper):
    class Options(StrategyWrapper.Options):
        every: int = Field(0, ge=0, description="also calibrate every N rounds (0: after the last round only)")
        num_virtual: int = Field(200, gt=0, description="virtual features drawn per class")
        ridge: float = Field(1e-4, ge=0, description="ridge added to each pooled covariance")
        epochs: int = Field(10, gt=0, description="classifier re-fitting epochs")
        lr: float = Field(0.01, gt=0, description="classifier re-fitting learning rate")
        momentum: float = Field(0.9, ge=0, lt=1, description="classifier re-fitting momentum, in [0, 1)")
        batch_size: int = Field(64, gt=0, description="classifier re-fitting batch size")

        def unused(self, cfg: Config, section: str) -> list[str]:
            out = super().unused(cfg, section)
            if self.every >= cfg.federation.rounds:
                out.append(f"{section}.every={self.every} ≥ federation.rounds={cfg.federation.rounds}: CCVR "
                           f"calibrates after the last round only, as with {section}.every=0")
            return out

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """A multi-expert model has no one classifier to calibrate: refused before round 1, not after the last."""
        super().check_config(cfg)
        require_single_network(cfg, "strategy ccvr re-fits the one classifier on virtual features")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.classifier: dict | None = None  # the calibrated classifier's state
        self.calibrated_round = 0  # the round whose global weights it was fitted on (0: none)
        self.latest_round = 0  # the round of the latest global weights
        self.calibration_rounds: list[int] = []

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        new, metrics = self.base.run_round(server_round, arrays, config, grid)
        if new is not None:
            self.latest_round = server_round
            every = self.opts.every
            if server_round == self.cfg.federation.rounds or (every > 0 and server_round % every == 0):
                self.calibrate(grid, new, server_round)
        return new, metrics

    def calibrate(self, grid: Grid, arrays: ArrayRecord, server_round: int) -> None:
        exp = experiment_for(self.cfg)
        model = load_into(model_for(self.cfg, exp), arrays)
        if not isinstance(getattr(model, "classifier", None), nn.Module):
            raise FedLTError("ccvr needs a model with one classifier (not a multi-expert model)")
        replies = self.query(grid, list(range(self.num_clients)), arrays, "feature-stats", server_round=server_round)
        stats = [r.content["stats"] for r in replies]
        mu, cov, counts = pool_class_stats(*(np.stack([s[k].numpy() for s in stats]) for k in ("mean", "cov", "count")))
        o = self.opts
        gen = torch_generator(self.cfg.seed, Stream.CCVR, server_round)
        feats, labels = sample_virtual(mu, cov, counts, o.num_virtual, o.ridge, gen)
        clf = fit_classifier(model.classifier, feats, labels, o.epochs, o.lr, o.batch_size, gen, o.momentum)
        self.classifier = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        self.calibrated_round = server_round
        self.calibration_rounds.append(server_round)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The base's model with the calibrated classifier, if it was fitted on these (the latest) weights."""
        valid = self.calibrated_round > 0 and self.calibrated_round == self.latest_round
        return with_classifier(self.base.eval_model(model), self.classifier, valid)

    def summary_extras(self) -> dict:
        out = {**self.base.summary_extras(), "ccvr_rounds": self.calibration_rounds}
        if self.global_arrays is not None:
            out["ccvr_uncalibrated"] = global_model_metrics(self, self.base.eval_model, self.base.transform_logits)
        return out

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), "ccvr_classifier": self.classifier, "ccvr_rounds": self.calibration_rounds,
                "ccvr_calibrated_round": self.calibrated_round, "ccvr_latest_round": self.latest_round}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
        self.classifier, self.calibration_rounds = state.get("ccvr_classifier"), list(state.get("ccvr_rounds", []))
        self.calibrated_round = state.get("ccvr_calibrated_round", 0)
        self.latest_round = state.get("ccvr_latest_round", 0)
