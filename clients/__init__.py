"""Client-method plug-ins: one file each, registered by name with ``@CLIENTS.register``."""

from clients import (  # noqa: F401  # noqa: F401
    fedavg,
    fedgrab,
    fedlc,
    fedprox,
    gbme,  # noqa: F401
    local_loss,
)
