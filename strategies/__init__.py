"""Server-strategy plug-ins: one file each, registered by name with ``@STRATEGIES.register``."""

from strategies import fedavg, fedavgm, fedprox  # noqa: F401
from strategies import gbme  # noqa: F401
from strategies import fedlc, posthoc_calibration  # noqa: F401
from strategies import ccvr, creff  # noqa: F401
from strategies import dp_client_fixed, dp_server_fixed  # noqa: F401
