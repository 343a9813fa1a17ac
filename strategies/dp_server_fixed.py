"""Central DP with server-side fixed clipping over any strategy (Flower's wrapper; fedlt/federation/dp.py):
``strategy.name=dp_server_fixed strategy.base=fedavg strategy.clipping_norm=1 strategy.noise_multiplier=1``.
summary.json gets ``privacy``: (ε, δ = 1/K unless ``delta`` > 0) from the RDP accountant."""

from fedlt.federation.compose import StrategyWrapper
from fedlt.federation.dp import DPOptions, DPFixedMixin
from fedlt.registry import STRATEGIES


@STRATEGIES.register("dp_server_fixed")
class DPServerFixed(StrategyWrapper):
    mixin = DPFixedMixin
    Options = DPOptions
