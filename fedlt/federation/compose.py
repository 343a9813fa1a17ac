"""Strategies that wrap any other strategy, chosen by config: ``strategy.name=<wrapper>``,
``strategy.base=<name>`` and ``strategy.base_options={...}`` (the base's own keys; a wrapper may wrap a
wrapper). The strategy built is the base's class extended by the wrapper's mixin, so every hook of the
base (setup, run_round, eval_model, transform_logits …) keeps working under the wrapper's.

A wrapper brings the FedAvg client unless ``client.name`` says otherwise (e.g. ``client.name=fedprox``
under ``strategy.base=fedprox``): the paired client of the base is not known when the config is read.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator

from fedlt.config import Config
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
        return validate_section("strategy.base_options", {**value, "name": base}, STRATEGIES.options(base), base)


def base_config(cfg: Config) -> Config:
    """``cfg`` with its (wrapper's) strategy section replaced by the wrapped strategy's."""
    return cfg.replace(strategy=cfg.strategy.base_options)


class StrategyWrapper:
    """Register a subclass with a ``mixin`` class; building it builds the base strategy's class extended by
    the mixin (wrappers of wrappers nest). Each mixin's ``wrap_init(opts)`` gets its own config section."""

    mixin: type = object
    client = "fedavg"
    Options = WrapperOptions

    def __new__(cls, cfg: Config, num_classes: int):
        combined, init_cfg, inits = resolve(cfg)
        strategy = combined(init_cfg, num_classes)
        for mixin, opts in inits:
            mixin.wrap_init(strategy, opts)
        return strategy


def resolve(cfg: Config) -> tuple[type, Config, list[tuple[type, WrapperOptions]]]:
    """(class to build, its config, [(mixin, wrapper options)] innermost first) for ``cfg``'s strategy."""
    cls = STRATEGIES.get(cfg.strategy.name)
    if not (isinstance(cls, type) and issubclass(cls, StrategyWrapper)):
        return cls, cfg, []
    opts = cfg.strategy
    inner, init_cfg, inits = resolve(base_config(cfg))
    combined = type(f"{cls.mixin.__name__}[{inner.__name__}]", (cls.mixin, inner), {})
    return combined, init_cfg, inits + [(cls.mixin, opts)]


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
