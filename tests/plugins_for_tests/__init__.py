"""Plug-ins used only by the tests: a client that fails, a strategy that stops once mid-run, a tiny synthetic
data set for runs of a whole command line in a few seconds."""

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from fedlt.client_method import ClientMethod
from fedlt.data.sources import Split
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import CLIENTS, DATASETS, STRATEGIES


def tiny_synthetic(root=None, **_):
    """10 classes of 16×16 grey images (class c: a bright square at a class-specific place, plus noise);
    100 training and 20 test images per class, the same on every call."""
    rng = np.random.default_rng(0)

    def split(per_class):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 96, size=(len(labels), 1, 16, 16))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 0, 2 + 6 * r:6 + 6 * r, 1 + 3 * col:4 + 3 * col] += 150
        return Split(labels=labels, num_classes=10, images=torch.from_numpy(images.astype(np.uint8)))

    return {"train": split(100), "test": split(20)}


DATASETS.register("tiny_synthetic", tiny_synthetic, num_classes=10, n_max=100, model="small_cnn", channels=1,
                  mean=(0.3,), std=(0.25,))


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
        stop_round: int = Field(2, description="the round at which to raise once")
        flag: str = Field("", description="the file whose presence arms the interruption")

    def configure_train(self, server_round, arrays, config, grid):
        flag = Path(self.opts.flag)
        if server_round == self.opts.stop_round and flag.is_file():
            flag.unlink()
            raise Interrupted(f"interrupted before round {server_round}")
        return super().configure_train(server_round, arrays, config, grid)
