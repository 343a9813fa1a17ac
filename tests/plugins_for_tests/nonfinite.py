"""Test plug-ins whose loss becomes NaN from a given round / epoch on (a diverging run, deterministically)."""

import torch.nn.functional as F

from fedlt.centralized.base import CentralizedMethod
from fedlt.client_method import ClientMethod
from fedlt.registry import CENTRALIZED, CLIENTS

NAN_FROM = 2  # the first round (federated) or epoch (centralized, 1-based) whose loss is NaN


def nan_after(start: bool):
    def objective(model, x, y):
        loss = F.cross_entropy(model(x).float(), y)
        return loss * float("nan") if start else loss
    return objective


@CLIENTS.register("nan_client")
class NaNClient(ClientMethod):
    """Cross-entropy, NaN on partition 1 from round NAN_FROM on."""

    def objective(self, model, data, config):
        return nan_after(int(config["server-round"]) >= NAN_FROM and int(config["partition-id"]) == 1)


@CENTRALIZED.register("nan_ce")
class NaNCE(CentralizedMethod):
    """Cross-entropy, NaN from epoch NAN_FROM on (``epoch`` is 0-based here)."""

    def objective(self, epoch):
        return nan_after(epoch + 1 >= NAN_FROM)
