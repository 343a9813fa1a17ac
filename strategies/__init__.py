"""Server-strategy plug-ins: one file each, registered by name with ``@STRATEGIES.register``."""

from strategies import (  # noqa: F401
    ccvr,
    creff,
    dp_client_fixed,
    dp_server_fixed,
    fedavg,
    fedavgm,
    fedbabu,
    fedetf,
    fedgrab,
    fedlc,
    fedloge,
    fedprox,
    fedrod,
    gbme,
    lfme,
    posthoc_calibration,
)
