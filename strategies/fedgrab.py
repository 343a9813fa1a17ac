"""Fed-GraB (Xiao et al., "Fed-GraB: Federated Long-tailed Learning with Self-Adjusting Gradient Balancer",
NeurIPS 2023), following the official code ZackZikaiXiao/FedGraB: ``fed_grab.py`` (the round loop),
``util/wene.py`` (``WENO``: the Direct Prior Analyzer and its head/middle/tail split) and the client's
balancer in ``util/losses.py`` (:mod:`clients.fedgrab`).

Server, each round: the global class prior is estimated (``strategy.prior``, default ``dpa``: the Direct Prior
Analyzer on the current global classifier, a running mean over the rounds as ``WENO.weno_estimation``; ``gbme``,
``dp_counts``, ``oracle``: one estimate before round 1, :mod:`strategies.global_prior`), the classes are split
into head / middle / tail by :func:`shot_split` (cumulative share 75 % / 95 %), and the clients' gradient
balancers control the tail classes (``strategy.controlled=tail``; ``all``: every class, as the release's
``fed_grab.py``, which never calls the analyzer and calls every class tail). Aggregation is FedAvg weighted by
n_k (the release weights the clients' models by the sizes of a random permutation of the clients, not their
own). The server keeps each client's balancer state between rounds for the stateless ClientApp.
The release's protocol trains every client every round (``args.frac = 1``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field

from clients.fedgrab import class_mask
from fedlt.config import Config
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.records import load_into
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES
from strategies.gbme.prior import COUNT_FLOOR, PriorEstimate, classifier_weight_dc, prior_report
from strategies.global_prior import DirectPriorAnalyzer, GlobalPriorOptions, PriorName, estimate_global_prior

SHOT_THRESHOLDS = (75.0, 95.0)  # WENO.weno_estimation: shot_split(…, threshold_3shot=[75, 95])
SGB_KEYS = ("sgb-pos", "sgb-neg", "sgb-out", "sgb-err")


def shot_split(distribution: np.ndarray, thresholds: tuple[float, float] = SHOT_THRESHOLDS) -> dict[str, list[int]]:
    """``WENO.shot_split``: classes sorted by estimated size (descending; the release's bubble sort keeps ties in
    index order), cumulative share s_i (%) after the i-th; cut_k = the i with s_{i−1} < t_k ≤ s_i (s_{−1} = 0;
    0 when none); head = sorted[0..cut_1], middle = sorted(cut_1..cut_2], tail = the rest."""
    d = np.asarray(distribution, dtype=np.float64)
    order = sorted(range(len(d)), key=lambda c: -d[c])  # stable: ties keep index order
    cum = np.cumsum(d[order]) / d.sum() * 100
    lower = np.concatenate([[0.0], cum[:-1]])
    cuts = []
    for t in thresholds:
        hit = [i for i in range(len(d)) if lower[i] < t <= cum[i]]
        cuts.append(hit[-1] if hit else 0)
    return {"head": order[:cuts[0] + 1], "middle": order[cuts[0] + 1:cuts[1] + 1], "tail": order[cuts[1] + 1:]}


@STRATEGIES.register("fedgrab")
class FedGraB(FedLTStrategy):
    client = "fedgrab"

    class Options(FedLTStrategy.Options, GlobalPriorOptions):
        prior: PriorName = Field(
            "dpa", description="global-prior estimator: dpa (Fed-GraB's, every round), gbme, dp_counts(_agm), oracle")
        controlled: Literal["tail", "all"] = Field(
            "tail", description="classes the balancers control: the prior's tail (paper) or all (release)")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.analyzer = DirectPriorAnalyzer(num_classes)
        self.estimate: PriorEstimate | None = None  # the one-off estimate (prior != dpa)
        self.prior_extras: dict = {}
        self.split: dict[str, list[int]] = {"head": [], "middle": [], "tail": list(range(num_classes))}
        self.sgb: dict[int, dict[str, list[float]]] = {}  # partition id -> its balancer state

    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        if self.opts.prior != "dpa":
            self.estimate, self.prior_extras = estimate_global_prior(self, grid, arrays, self.opts.prior)
        return arrays

    def prior_distribution(self) -> np.ndarray:
        """The class sizes the split reads: DPA's running estimate (out of 10 000), or π̂."""
        return self.analyzer.estimate() if self.estimate is None else self.estimate.pi_hat

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.opts.prior == "dpa":
            model = load_into(model_for(self.cfg, experiment_for(self.cfg)), arrays)
            self.analyzer.update(classifier_weight_dc(model).T)
        self.split = shot_split(self.prior_distribution())
        return super().run_round(server_round, arrays, config, grid)

    def controlled_classes(self) -> list[int]:
        return list(range(self.num_classes)) if self.opts.controlled == "all" else sorted(self.split["tail"])

    def train_config(self, server_round: int, partition_id: int) -> dict:
        out = {"sgb-open": class_mask(self.controlled_classes(), self.num_classes)}
        state = self.sgb.get(partition_id)
        if state is not None:
            out.update(state)
        return out

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for msg in replies:  # keep each client's balancer; the state is no metric to average
            metrics = msg.content["metrics"]
            pid = int(metrics["partition-id"])
            if all(k in metrics for k in SGB_KEYS):
                self.sgb[pid] = {k: list(metrics[k]) for k in SGB_KEYS}
                for k in SGB_KEYS:
                    del metrics[k]
        return super().aggregate_checked(server_round, replies)

    def estimated_prior(self) -> PriorEstimate:
        """π̂ as a :class:`PriorEstimate` (DPA: its running estimate floored at 5 of the training-set size)."""
        if self.estimate is not None:
            return self.estimate
        n = float(experiment_for(self.cfg).train_counts.sum())
        p = self.analyzer.estimate() / max(self.analyzer.estimate().sum(), 1e-12)
        p = np.maximum(p, COUNT_FLOOR / n)
        p = p / p.sum()
        return PriorEstimate(p[None], (p * n)[None], p * n, p)

    def summary_extras(self) -> dict:
        out = {"prior_estimator": self.opts.prior, "shot_split": self.split,
               "controlled_classes": self.controlled_classes(), **self.prior_extras}
        if self.estimate is not None or self.analyzer.calls:
            out.update(prior_report(self.estimated_prior(), experiment_for(self.cfg).train_counts))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "analyzer": self.analyzer.state_dict(),
                "estimate": None if self.estimate is None else self.estimate.state_dict(),
                "prior_extras": self.prior_extras, "split": self.split,
                "sgb": {str(k): {n: torch.tensor(v, dtype=torch.float64) for n, v in s.items()}
                        for k, s in self.sgb.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.analyzer.load_state_dict(state["analyzer"])
        if state.get("estimate") is not None:
            self.estimate = PriorEstimate.from_state(state["estimate"])
        self.prior_extras, self.split = state.get("prior_extras", {}), state["split"]
        self.sgb = {int(k): {n: torch.as_tensor(v).tolist() for n, v in s.items()} for k, s in state["sgb"].items()}
