"""CCVR (Luo et al., NeurIPS 2021; METHODS.md §3.5): classifier calibration with virtual representations,
over any strategy (``strategy.base``, default FedAvg).

After round T (and every ``every`` rounds when > 0) all K clients send, on the new global model, each class's
feature mean, unbiased covariance and count (query ``feature-stats``; this reveals class counts). The server
pools them (fedlt/federation/features.py), adds ``ridge``·I, draws ``num_virtual`` features for every class
from N(μ_c, Σ_c) and re-fits a copy of the global classifier with CE on them. That classifier is used for
evaluation; the base strategy's weights go on unchanged. summary.json gets the metrics before calibration.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field
from torch import nn

from fedlt.errors import FedLTError
from fedlt.experiment import STREAM_CENTRAL, experiment_for, model_for, torch_generator
from fedlt.federation.compose import StrategyWrapper, global_model_metrics, with_classifier
from fedlt.federation.features import fit_classifier, pool_class_stats, sample_virtual
from fedlt.federation.records import load_into
from fedlt.registry import STRATEGIES


class CCVRMixin:
    def wrap_init(self, opts: "CCVR.Options") -> None:
        self.ccvr_opts = opts
        self.ccvr_classifier: dict | None = None
        self.ccvr_for: ArrayRecord | None = None
        self.ccvr_rounds: list[int] = []

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        new, metrics = super().run_round(server_round, arrays, config, grid)
        every = self.ccvr_opts.every
        if new is not None and (server_round == self.cfg.federation.rounds
                                or (every > 0 and server_round % every == 0)):
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
        o = self.ccvr_opts
        gen = torch_generator(self.cfg.seed, STREAM_CENTRAL, 101, server_round)
        feats, labels = sample_virtual(mu, cov, counts, o.num_virtual, o.ridge, gen)
        clf = fit_classifier(model.classifier, feats, labels, o.epochs, o.lr, o.batch_size, gen, o.momentum)
        self.ccvr_classifier = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        self.ccvr_for = arrays
        self.ccvr_rounds.append(server_round)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return with_classifier(super().eval_model(model), self.ccvr_classifier, self.ccvr_for is self.global_arrays)

    def summary_extras(self) -> dict:
        out = {**super().summary_extras(), "ccvr_rounds": self.ccvr_rounds}
        if self.global_arrays is not None:
            out["ccvr_uncalibrated"] = global_model_metrics(self, super().eval_model, super().transform_logits)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ccvr_classifier": self.ccvr_classifier, "ccvr_rounds": self.ccvr_rounds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ccvr_classifier, self.ccvr_rounds = state.get("ccvr_classifier"), state.get("ccvr_rounds", [])


@STRATEGIES.register("ccvr")
class CCVR(StrategyWrapper):
    mixin = CCVRMixin

    class Options(StrategyWrapper.Options):
        every: int = Field(0, ge=0, description="also calibrate every N rounds (0: after the last round only)")
        num_virtual: int = Field(200, gt=0, description="virtual features drawn per class")
        ridge: float = Field(1e-4, ge=0, description="ridge added to each pooled covariance")
        epochs: int = Field(10, gt=0, description="classifier re-fitting epochs")
        lr: float = Field(0.01, gt=0, description="classifier re-fitting learning rate")
        momentum: float = Field(0.9, ge=0, description="classifier re-fitting momentum")
        batch_size: int = Field(64, gt=0, description="classifier re-fitting batch size")
