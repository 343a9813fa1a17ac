"""Test plug-ins that override the hooks the round loop guards: a strategy that aggregates in Flower's own
``aggregate_train``, one whose ``aggregate_checked`` forgets its ``return``, a client method that sends weights
the global model cannot load, and a client method that keeps per-client state on ``self`` for its round
metrics (with a strategy that records them per partition)."""

from __future__ import annotations

from typing import Literal

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from fedlt.client_method import ClientMethod, FitResult
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import CLIENTS, STRATEGIES


@STRATEGIES.register("flower_aggregate_train")
class FlowerAggregateTrain(FedLTStrategy):
    """FedAvg by Flower's own ``aggregate_train``, overridden without calling fedlt's (as the hook table of
    docs/plugins.md once suggested): it must still get the replies with the failed clients' removed."""

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return FedAvg.aggregate_train(self, server_round, replies)


@STRATEGIES.register("forgets_return")
class ForgetsReturn(FedLTStrategy):
    """An ``aggregate_checked`` that aggregates and forgets to return the result."""

    def aggregate_checked(self, server_round: int, replies: list[Message]) -> None:
        super().aggregate_checked(server_round, replies)


@CLIENTS.register("misfit_client")
class MisfitClient(ClientMethod):
    """Plain FedAvg, except that partition 1 sends ``client.key`` dropped or flattened (``client.change``)."""

    class Options(ClientMethod.Options):
        key: str = Field("classifier.weight", description="the weight partition 1 breaks")
        change: Literal["drop", "flatten"] = Field("drop", description="leave it out, or send it flattened")

    def fit(self, model, data, config, generator, augment) -> FitResult:
        result = super().fit(model, data, config, generator, augment)
        if int(config["partition-id"]) == 1:
            if self.opts.change == "drop":
                del result.state[self.opts.key]
            else:
                result.state[self.opts.key] = result.state[self.opts.key].flatten()
        return result


@CLIENTS.register("local_classes_client")
class LocalClassesClient(ClientMethod):
    """Plain FedAvg that reports the number of classes in its local data, found in ``prepare`` and kept on
    ``self`` until ``round_metrics`` (docs/plugins.md: state a method finds before training lives on ``self``)."""

    def prepare(self, model, data, config, generator, augment) -> None:
        self.local_classes = int((data.class_counts > 0).sum())

    def round_metrics(self, objective) -> dict[str, int]:
        return {"local-classes": self.local_classes}


@STRATEGIES.register("local_classes_seen")
class LocalClassesSeen(FedLTStrategy):
    """FedAvg that records each partition's reported ``local-classes`` (summary.json's ``local_classes``)."""

    client = "local_classes_client"

    def __init__(self, cfg, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.seen: dict[str, int] = {}

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for msg in replies:
            metrics = msg.content["metrics"]
            self.seen[str(int(metrics["partition-id"]))] = int(metrics["local-classes"])
        return super().aggregate_checked(server_round, replies)

    def summary_extras(self) -> dict:
        return {"local_classes": self.seen}
