"""Central DP with client-side fixed clipping over any strategy (Flower's wrapper and ``fixedclipping_mod``;
fedlt/federation/dp.py): ``strategy.name=dp_client_fixed strategy.base=fedavg strategy.clipping_norm=1
strategy.noise_multiplier=1``. Each client clips its own update to norm C before replying; the server
adds N(0, (σ·C/S)²) to the mean. summary.json gets ``privacy`` as for ``dp_server_fixed``."""

from fedlt.federation.compose import StrategyWrapper
from fedlt.federation.dp import DPOptions, DPClientFixedMixin
from fedlt.registry import STRATEGIES


@STRATEGIES.register("dp_client_fixed")
class DPClientFixed(StrategyWrapper):
    mixin = DPClientFixedMixin
    Options = DPOptions
