"""FedAvg (McMahan et al., AISTATS 2017): w_{t+1} = Σ_k (n_k / Σ_j n_j)·w_k over the round's cohort."""

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES

STRATEGIES.register("fedavg", FedLTStrategy)
