"""FedETF (Li et al., ICCV 2023; official code ZexiLee/ICCV-2023-FedETF, ``server_funct.py``): FedAvg
(weights n_k / Σ n_j) over the backbone, the projection and the temperature; the simplex-ETF classifier is
fixed and the same in every process (clients/fedetf.py). Global accuracy: the aggregated model with the
global ETF; the personalised model: clients/fedetf.py ``personalise``."""

from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import STRATEGIES


@STRATEGIES.register("fedetf")
class FedETF(FedLTStrategy):
    client = "fedetf"
    client_only = True
