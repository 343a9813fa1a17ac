"""The FedAvg client: E local epochs of SGD on cross-entropy from the global weights."""

from fedlt.client_method import ClientMethod
from fedlt.registry import CLIENTS

CLIENTS.register("fedavg", ClientMethod)
