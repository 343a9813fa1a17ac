"""LFME, federated (Xiang et al., "Learning From Multiple Experts: Self-paced Knowledge Distillation for
Long-tailed Classification", ECCV 2020; xiangly55/LFME): the experts are trained by client groups, the student
distilled on the clients; the client side is :mod:`clients.lfme`, the formulas :mod:`fedlt.losses.lfme`.

- rounds 1..``expert_rounds`` (phase 1): expert g (one per class group, many/medium/few of the global counts)
  is trained by FedAvg within its client group, the clients holding group-g samples: every cohort client trains
  each expert it holds data for on those samples, and expert g is averaged weighted by the clients' group-g
  counts (``n-expert<g>``); the student is not trained;
- later rounds (phase 2): the experts are frozen and the student is trained by FedAvg on the LFME objective,
  computed on the clients, where the data are (the server holds none, so it cannot distil itself). Before each
  phase-2 round but the first, the query ``lfme-accuracy`` asks the round's cohort how well the global student
  and the experts classify their samples, per class; the server's class-mean accuracy per group gives the
  self-paced weights λ_g (:func:`fedlt.losses.lfme.self_paced_weight`) sent with the round (the official
  evaluates after every epoch; λ = 1 in the first phase-2 round, as the official's accuracy starts at 0).

Why the client groups are "the clients that hold group-g data" and not GBME's disjoint groups of clients
(:mod:`strategies.gbme`): an LFME expert learns from every sample of its classes (the official
``Shot_Dataset``), and tail samples are spread over all clients; a disjoint third of the clients would hold a
third of them. A client of several groups trains several experts in one round.

The global model is :class:`~fedlt.centralized.lfme.LFMEModel`; it predicts with the student, so phase-1 rows
of metrics.jsonl show the untrained student.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field

from fedlt.centralized.lfme import lfme_groups
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.experiment import experiment_for
from fedlt.federation.records import to_arrays, to_state
from fedlt.federation.strategy import FedLTStrategy, reply_metrics
from fedlt.losses.lfme import self_paced_weight
from fedlt.registry import STRATEGIES


def group_accuracy(correct: np.ndarray, count: np.ndarray, groups: list[list[int]]) -> list[float]:
    """Class-mean accuracy per group over the classes with samples (``shot_acc``); 0 for a group without any."""
    out = []
    for cls in groups:
        present = [c for c in cls if count[c] > 0]
        out.append(float(np.mean([correct[c] / count[c] for c in present])) if present else 0.0)
    return out


def part_of(key: str) -> str:
    """The count that weighs parameter ``key`` in the average: ``n-expert<g>`` or ``n-student``."""
    parts = key.split(".")
    return f"n-expert{parts[1]}" if parts[0] == "experts" else "n-student"


def weighted_average(global_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]],
                     weights: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Per parameter: Σ_k n_k·w_k / Σ_k n_k with n_k the client's count of the parameter's part; the global
    value where no client trained that part (Σ n_k = 0). Integer buffers are rounded."""
    out = {}
    for key, value in global_state.items():
        n = torch.tensor([w[part_of(key)] for w in weights], dtype=torch.float64)
        if n.sum() == 0:
            out[key] = value
            continue
        avg = sum(nk * s[key].double() for nk, s in zip(n, states)) / n.sum()
        out[key] = avg.round().to(value.dtype) if not value.is_floating_point() else avg.to(value.dtype)
    return out


@STRATEGIES.register("lfme")
class LFMEStrategy(FedLTStrategy):
    client = "lfme"

    class Options(FedLTStrategy.Options):
        expert_rounds: int = Field(1, ge=1, description="lfme: rounds of phase 1 (the experts); the student after")
        temperature: float = Field(2.0, gt=0, description="lfme: distillation temperature T")
        decay_thresh: float = Field(0.3, ge=0, lt=1, description="lfme: self-paced threshold θ")
        curriculum: bool = Field(True, description="lfme: curriculum instance weights on the student's logits")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.strategy.expert_rounds >= cfg.federation.rounds:
            raise FedLTError(f"config key 'strategy.expert_rounds' must be < federation.rounds "
                             f"({cfg.federation.rounds}) to leave rounds for the student, got {cfg.strategy.expert_rounds}")
        if cfg.client.name != "lfme":
            raise FedLTError(f"strategy lfme needs client.name=lfme (its model and phases), got {cfg.client.name!r}")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.groups = lfme_groups(experiment_for(cfg).train_counts)
        self.lambdas = [1.0] * len(self.groups)
        self.accuracy: dict[str, list[float]] = {}

    def phase(self, server_round: int) -> int:
        return 1 if server_round <= self.opts.expert_rounds else 2

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.phase(server_round) == 2:
            self.lambdas = self.self_paced_weights(server_round, arrays, grid)
        return super().run_round(server_round, arrays, config, grid)

    def self_paced_weights(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[float]:
        """λ_g from the cohort's per-class counts of correct student and expert predictions (1 in the first
        phase-2 round: the official's student accuracy starts at 0)."""
        if server_round == self.opts.expert_rounds + 1:
            return [1.0] * len(self.groups)
        replies = self.query(grid, self.cohort(server_round), arrays, "lfme-accuracy", server_round=server_round)
        total = {k: np.sum([np.asarray(reply_metrics(m)[k]) for m in replies], axis=0)
                 for k in ("student-correct", "expert-correct", "count")}
        student = group_accuracy(total["student-correct"], total["count"], self.groups)
        expert = group_accuracy(total["expert-correct"], total["count"], self.groups)
        self.accuracy = {"student": student, "expert": expert}
        return [self_paced_weight(s, e, self.opts.decay_thresh) for s, e in zip(student, expert)]

    def train_config(self, server_round: int, partition_id: int) -> dict:
        first_student = self.opts.expert_rounds + 1
        return {"lfme-phase": self.phase(server_round), "lfme-round": server_round - first_student + 1,
                "lfme-rounds": self.cfg.federation.rounds - self.opts.expert_rounds, "lfme-lambdas": self.lambdas,
                "lfme-temperature": self.opts.temperature, "lfme-curriculum": self.opts.curriculum}

    def aggregate_checked(self, server_round: int,
                          replies: list) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each part averaged over the clients that trained it (:func:`weighted_average`)."""
        if not replies:
            return None, None
        metrics = [reply_metrics(m) for m in replies]
        state = weighted_average(to_state(self.global_arrays), [to_state(m.content["arrays"]) for m in replies],
                                 metrics)
        n = np.array([float(m["num-examples"]) for m in metrics])
        loss = float(np.dot(n, [float(m["train_loss"]) for m in metrics]) / n.sum())
        return to_arrays(state), MetricRecord({"train_loss": loss, "num-examples": int(n.sum())})

    def summary_extras(self) -> dict:
        return {"lfme_groups": self.groups, "lfme_lambdas": self.lambdas, "lfme_accuracy": self.accuracy}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lambdas": self.lambdas, "accuracy": self.accuracy}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lambdas = list(state.get("lambdas", self.lambdas))
        self.accuracy = dict(state.get("accuracy", {}))
