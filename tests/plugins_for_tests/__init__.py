"""Plug-ins used only by the tests: a client that fails, a strategy that stops once mid-run."""

import os
from pathlib import Path

from fedlt.client_method import ClientMethod
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import CLIENTS, STRATEGIES


@CLIENTS.register("failing_client")
class FailingClient(ClientMethod):
    """Raises on partition 1, trains normally elsewhere."""

    def fit(self, model, data, config, generator, augment):
        if int(config["partition-id"]) == 1:
            raise ValueError("deliberate failure on partition 1")
        return super().fit(model, data, config, generator, augment)


class Interrupted(RuntimeError):
    pass


@STRATEGIES.register("interrupt_once")
class InterruptOnce(FedLTStrategy):
    """FedAvg that raises once at round ``stop_round`` while the flag file exists (simulates a killed run)."""

    class Options(FedLTStrategy.Options):
        stop_round: int = 2
        flag: str = ""

    def configure_train(self, server_round, arrays, config, grid):
        flag = Path(self.opts.flag)
        if server_round == self.opts.stop_round and flag.is_file():
            flag.unlink()
            raise Interrupted(f"interrupted before round {server_round}")
        return super().configure_train(server_round, arrays, config, grid)
