"""GBME: global balanced experts (Zeng et al., "Global Balanced Experts for Federated Long-Tailed Learning",
ICCV 2023), following the official code Spinozaaa/Federated-Long-tailed-Learning
(fedml_api/clsimb_fedavg/fedavg_api.py) except where that release departs from the paper (said below).

(a) before round 1, all K clients train one CE epoch from θ0; the server estimates π̂ from their classifier
    updates (:mod:`strategies.gbme.prior`); θ0 is only read (the release sums the experts' classifier
    weights in place into θ0's and the clients' first expert while it estimates);
(b) clients are sorted by score_k = Σ_c N̂_c·p̂_kc (descending) and cut into M contiguous groups at
    ⌊K·m/M⌋ as the release (``strategy.group_rule=official``; ``array_split``: np.array_split's cut);
(c) rounds t ≤ ⌈joint_fraction·T⌉ (0-based t < 0.6T): one FedAvg aggregation every round of all experts on
    Σ_m CE(z_m + log π̂, y) (the release's joint-phase rounds train the clients but never aggregate them);
(d) later rounds: for m = 0..M−1 one FedAvg sub-round on expert m with the release's cohort: int(β_g·S) clients
    of group m and int((1 − β_g)·S) others, or the whole group and the rest of int(β_g·S) where the group is
    that small (:func:`~strategies.gbme.prior.sample_expert_cohort`; all distinct, where the release draws
    the others from all K, so a client can be drawn twice), loss
    CE(z_m + log π̂, y) with no multiplier (the release multiplies it by 5, which the paper does not state);
(e) prediction argmax z̄ (the model's mean output); no post-hoc adjustment.
summary.json gets π̂, its L1/KL error, the groups and each expert's test accuracy.

``strategy.prior`` chooses the π̂ of the losses (:mod:`strategies.global_prior`): ``gbme`` (the default, GBME's
own), ``dpa`` (Fed-GraB's analyzer), ``dp_counts``/``dp_counts_agm`` (counts under Gaussian DP noise) or
``oracle`` (the true training prior, which no server knows: an ablation). Estimation (a) and grouping (b) are
GBME's in every case; ``estimated`` is read as ``gbme``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field, field_validator

from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.records import load_into
from fedlt.federation.strategy import FedLTStrategy
from fedlt.models.experts import require_experts
from fedlt.registry import STRATEGIES
from fedlt.streams import Stream, seeded_rng
from fedlt.train import predict_logits
from strategies.gbme.prior import PriorEstimate, estimate_prior, group_clients, prior_report, sample_expert_cohort
from strategies.global_prior import GlobalPriorOptions, estimate_global_prior, oracle_estimate, query_classifiers


@STRATEGIES.register("gbme")
class GBME(FedLTStrategy):
    client = "gbme"

    class Options(FedLTStrategy.Options, GlobalPriorOptions):
        joint_fraction: float = Field(0.6, ge=0, le=1, description="fraction of the rounds in the joint phase")
        beta_g: float = Field(0.8, ge=0, le=1, description="share of an expert's cohort drawn from its own group")
        group_rule: Literal["official", "array_split"] = Field(
            "official", description="client groups cut at floor(K*m/M) (official) or by np.array_split")

        @field_validator("prior", mode="before")
        @classmethod
        def _estimated_is_gbme(cls, value: object) -> object:
            return "gbme" if value == "estimated" else value

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """A multi-expert model with at most one expert per client: the clients are cut into one group per
        expert (:func:`group_clients`), so more experts than clients leave groups empty, their experts trained
        on clients of the other groups only."""
        require_experts(cfg, "strategy gbme")
        experts, clients = cfg.model.num_experts, cfg.partition.num_clients
        if experts > clients:
            raise FedLTError(f"config key 'model.num_experts' ({experts}) exceeds partition.num_clients={clients}: "
                             f"strategy gbme cuts the clients into one group per expert, so {experts - clients} "
                             f"group{'s' if experts - clients > 1 else ''} would be empty")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.prior: PriorEstimate | None = None  # GBME's estimate (the groups)
        self.balance: PriorEstimate | None = None  # the estimate of strategy.prior (the losses)
        self.prior_extras: dict = {}
        self.groups: list[list[int]] = []
        self.scores: list[float] = []
        self.expert = -1

    def joint_phase(self, server_round: int) -> bool:
        return server_round - 1 < self.opts.joint_fraction * self.cfg.federation.rounds

    # ------------------------------------------------------------------ (a), (b)
    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        model = model_for(self.cfg, experiment_for(self.cfg))
        if not hasattr(model, "expert_forward"):
            raise TypeError("gbme needs a multi-expert model: model.name=resnet32_experts, resnet18_gn_experts or "
                            "small_cnn_experts")
        classifiers = query_classifiers(self, grid, arrays)
        self.prior = estimate_prior(*classifiers)
        self.balance, self.prior_extras = estimate_global_prior(self, grid, arrays, self.opts.prior, classifiers)
        groups, scores = group_clients(self.prior.p_hat, self.prior.counts, model.num_experts,
                                       self.opts.group_rule)
        self.groups, self.scores = groups, scores.tolist()
        return arrays

    def balancing_prior(self) -> np.ndarray:
        """The π in the clients' CE(z + log π, y): the estimate of ``strategy.prior`` (GBME's own when none was
        made apart, e.g. a checkpoint written before the estimator was a choice)."""
        if self.opts.prior == "oracle":
            return oracle_estimate(self.cfg).pi_hat
        return (self.balance or self.prior).pi_hat

    def train_config(self, server_round: int, partition_id: int) -> dict:
        if self.prior is None:  # the estimation query itself
            return {}
        return {"log-prior": np.log(self.balancing_prior()).tolist(), "expert": self.expert}

    # ------------------------------------------------------------------ (c), (d)
    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.joint_phase(server_round):
            self.expert = -1
            return super().run_round(server_round, arrays, config, grid)
        size = max(1, int(round(self.fraction_train * self.num_clients)))
        cohorts, losses = [], {}
        metrics = None
        for m, group in enumerate(self.groups):
            rng = seeded_rng(self.cfg.seed, Stream.COHORT, server_round, m + 1)
            cohort = sample_expert_cohort(rng, group, self.num_clients, size, self.opts.beta_g)
            self.expert = m
            msgs = self.outer.messages(cohort, arrays, config, MessageType.TRAIN, server_round)
            new, metrics = self.outer.aggregate_train(server_round, grid.send_and_receive(msgs))
            if new is None:
                raise RuntimeError(f"round {server_round}, expert {m}: no client returned weights")
            arrays = new
            cohorts.append(cohort)
            losses[f"expert{m}_train_loss"] = (metrics or {}).get("train_loss")
        self.expert = -1
        self.last_cohort = cohorts
        out = MetricRecord({k: v for k, v in {**dict(metrics or {}), **losses}.items() if v is not None})
        return arrays, out

    # ------------------------------------------------------------------ reports
    def expert_accuracy(self) -> list[float]:
        exp = experiment_for(self.cfg)
        model = load_into(model_for(self.cfg, exp), self.global_arrays)
        test = exp.tensor_data("test")
        model.eval()
        with torch.no_grad():
            accs = []
            for m in range(model.num_experts):
                logits = predict_logits(model.expert_model(m), test, self.cfg.eval.batch_size)
                accs.append(float((logits.argmax(1) == test.labels).float().mean()))
        return accs

    def summary_extras(self) -> dict:
        out = {"expert_groups": self.groups, "client_scores": self.scores}
        counts = experiment_for(self.cfg).train_counts
        if self.balance is not None:
            out.update(prior_report(self.balance, counts), prior_estimator=self.opts.prior, **self.prior_extras)
        if self.prior is not None and self.opts.prior != "gbme":
            out["gbme_prior"] = prior_report(self.prior, counts)
        if self.global_arrays is not None:
            out["expert_accuracy"] = self.expert_accuracy()
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prior": None if self.prior is None else self.prior.state_dict(),
                "balance": None if self.balance is None else self.balance.state_dict(),
                "prior_extras": self.prior_extras, "groups": self.groups, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("prior") is not None:
            self.prior = PriorEstimate.from_state(state["prior"])
        if state.get("balance") is not None:
            self.balance = PriorEstimate.from_state(state["balance"])
        self.prior_extras = state.get("prior_extras", {})
        self.groups, self.scores = state.get("groups", []), state.get("scores", [])

