"""Strategies that wrap any other strategy, chosen by config: ``strategy.name=<wrapper>``,
``strategy.base=<name>`` and ``strategy.base_options={...}`` (the base's own keys; a wrapper may wrap a
wrapper). A wrapper is a :class:`StrategyWrapper`: it holds the built base strategy and hands it every hook
it does not change (setup, run_round, eval_model, transform_logits …), so ``isinstance(strategy, CCVR)``
holds and no class is built at run time.

``client.name`` defaults to the client method of the innermost strategy the wrapper wraps
(:func:`fedlt.config.paired_strategy`: ``fedprox``'s under ``strategy.base=fedprox``); a run's name says it
where it is not FedAvg's (``posthoc_calibration+fedprox``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator
from torch import nn

from fedlt.config import Config
from fedlt.federation.strategy import FedLTStrategy
from fedlt.options import StrategyOptions
from fedlt.registry import STRATEGIES


class WrapperOptions(StrategyOptions):
    """A wrapper's keys: the strategy it wraps and that strategy's own keys (validated by its ``Options``)."""

    base: str = Field("fedavg", description="the wrapped strategy (any registered one, a wrapper too)")
    base_options: SerializeAsAny[StrategyOptions] = Field(
        default_factory=dict, validate_default=True, description="the wrapped strategy's own keys, e.g. {mu: 0.1}")

    @field_validator("base_options", mode="before")
    @classmethod
    def _validate_base(cls, value: Any, info: ValidationInfo) -> StrategyOptions:
        if isinstance(value, StrategyOptions):
            return value
        from fedlt.config import validate_section

        base = info.data.get("base", "fedavg")
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of the base strategy's keys")
        if value.get("name", base) != base:  # the base is named by strategy.base; another name here was dropped
            raise ValueError(f"names strategy {value['name']!r}, but the wrapped strategy is strategy.base={base}: "
                             f"set strategy.base={value['name']} (base_options holds the base's own keys)")
        return validate_section("strategy.base_options", {**value, "name": base}, STRATEGIES.options(base), base)


def base_config(cfg: Config) -> Config:
    """``cfg`` with its (wrapper's) strategy section replaced by the wrapped strategy's."""
    return cfg.replace(strategy=cfg.strategy.base_options)


def _shared(name: str) -> property:
    """An attribute of a wrapper that is its base's (read and written through to ``self.base``)."""
    return property(lambda self: getattr(self.base, name), lambda self, value: setattr(self.base, name, value),
                    doc=f"the base strategy's ``{name}``")


class StrategyWrapper(FedLTStrategy):
    """A strategy around another: it builds its base (``strategy.base`` with ``strategy.base_options``) as
    ``self.base`` and hands every hook to it; a wrapper overrides the hooks it changes and calls
    ``self.base.<hook>`` for the base's part. The state the round loop reads or sets (the node map, cohort,
    failures, fit time, latest global weights) is the base's own, so one copy exists however deep the nesting.
    The base's round calls its hooks through ``outer`` (the outermost wrapper), so a wrapper's override of
    ``configure_train``, ``messages``, ``train_config``, ``aggregate_train`` or ``aggregate_checked`` reaches
    inside the base's round."""

    client = "fedavg"
    Options = WrapperOptions

    def __init__(self, cfg: Config, num_classes: int) -> None:
        self.base: FedLTStrategy = STRATEGIES.get(cfg.strategy.base)(base_config(cfg), num_classes)
        super().__init__(cfg, num_classes)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The wrapped strategy's check, on its own section."""
        STRATEGIES.get(cfg.strategy.base).check_config(base_config(cfg))

    # the state shared with the base ------------------------------------------------------------
    @property
    def outer(self) -> FedLTStrategy:
        return self._outer

    @outer.setter
    def outer(self, strategy: FedLTStrategy) -> None:
        self._outer = strategy
        self.base.outer = strategy

    node_of = _shared("node_of")
    failures = _shared("failures")
    failures_by_round = _shared("failures_by_round")
    round_record = _shared("round_record")
    last_cohort = _shared("last_cohort")
    fit_seconds = _shared("fit_seconds")
    train_images = _shared("train_images")
    global_arrays = _shared("global_arrays")

    # every hook goes to the base unless the wrapper overrides it -------------------------------
    def cohort(self, server_round: int) -> list[int]:
        return self.base.cohort(server_round)

    def messages(self, pids: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str,
                 server_round: int) -> list[Message]:
        return self.base.messages(pids, arrays, config, message_type, server_round)

    def check_replies(self, replies: Iterable[Message]) -> list[Message]:
        return self.base.check_replies(replies)

    def begin_round(self, server_round: int) -> None:
        self.base.begin_round(server_round)

    def failure_summary(self) -> dict:
        return self.base.failure_summary()

    def query(self, grid: Grid, pids: list[int], arrays: ArrayRecord, action: str, config: dict | None = None,
              timeout: float = 3600, server_round: int = 0) -> list[Message]:
        return self.base.query(grid, pids, arrays, action, config, timeout, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.base.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.base.aggregate_train(server_round, replies)

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.base.aggregate_checked(server_round, replies)

    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        return self.base.setup(grid, arrays)

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.base.run_round(server_round, arrays, config, grid)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.base.eval_model(model)

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return self.base.train_config(server_round, partition_id)

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        return self.base.client_records(server_round, partition_id)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.base.transform_logits(logits)

    def summary_extras(self) -> dict:
        return self.base.summary_extras()

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


def global_model_metrics(strategy, eval_model, transform_logits) -> dict:
    """Test metrics (accuracy, balanced, many/medium/few) of the strategy's latest global weights, evaluated
    through the given ``eval_model`` and ``transform_logits`` (e.g. a base's, to report a wrapper's effect)."""
    from fedlt.evaluation import evaluate_model
    from fedlt.experiment import experiment_for, model_for
    from fedlt.federation.records import load_into
    from fedlt.metrics import GROUPS

    exp = experiment_for(strategy.cfg)
    model = eval_model(load_into(model_for(strategy.cfg, exp), strategy.global_arrays))
    m = evaluate_model(model, exp.tensor_data("test"), exp.train_counts, strategy.cfg.eval.batch_size,
                       transform_logits)
    return {k: m[k] for k in ("accuracy", "balanced_accuracy", *GROUPS)}


def with_classifier(model, classifier_state: dict | None, valid: bool = True):
    """A copy of ``model`` with ``classifier_state`` loaded into its classifier (``model`` itself when there
    is none or it is not ``valid`` for these weights)."""
    if classifier_state is None or not valid:
        return model
    out = copy.deepcopy(model)
    out.classifier.load_state_dict(classifier_state)
    return out
