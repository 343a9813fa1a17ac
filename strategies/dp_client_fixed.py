"""Central DP with client-side fixed clipping over any strategy (Flower's
``DifferentialPrivacyClientSideFixedClipping`` on the server, its ``fixedclipping_mod`` on the client through
fedlt/federation/dp.py's ``client_clipping_mod``): ``strategy.name=dp_client_fixed strategy.base=fedavg
strategy.clipping_norm=1 strategy.noise_multiplier=1``. Each client clips its own update to norm C before
replying, so the server never sees an unclipped update; the server adds N(0, (σ·C/S)²) to the mean.
summary.json gets ``privacy`` as for ``dp_server_fixed``."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the key Flower's mods read

from fedlt.registry import STRATEGIES
from strategies.dp_server_fixed import DPServerFixed


@STRATEGIES.register("dp_client_fixed")
class DPClientFixed(DPServerFixed):
    """Client-side clipping: train messages carry the clipping norm, clients clip, Flower's wrapper averages
    and adds the noise."""

    flower_wrapper = DifferentialPrivacyClientSideFixedClipping
    clipping = "client"

    def messages(self, pids: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str,
                 server_round: int) -> list[Message]:
        if message_type == MessageType.TRAIN:
            config = ConfigRecord({**dict(config), KEY_CLIPPING_NORM: self.opts.clipping_norm})
        return super().messages(pids, arrays, config, message_type, server_round)
