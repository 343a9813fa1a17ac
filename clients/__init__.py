"""Client-method plug-ins: one file each, registered by name with ``@CLIENTS.register``."""

from clients import (  # noqa: F401
    area,
    fedavg,
    fedbabu,
    fedetf,
    fedgrab,
    fedlc,
    fedloge,
    fedprox,
    fedrod,
    gbme,
    glmc,
    lfme,
    local_loss,
    ncl,
    sbcl,
    shike,
    tde,
    tlc,
)
