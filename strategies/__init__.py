"""Server-strategy plug-ins: one file each, registered by name with ``@STRATEGIES.register``."""

from strategies import (  # noqa: F401  # noqa: F401  # noqa: F401  # noqa: F401
    ccvr,
    creff,
    dp_client_fixed,
    dp_server_fixed,
    fedavg,
    fedavgm,
    fedgrab,
    fedlc,
    fedprox,
    gbme,  # noqa: F401
    posthoc_calibration,
)
