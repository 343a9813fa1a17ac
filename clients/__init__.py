"""Client-method plug-ins: one file each, registered by name with ``@CLIENTS.register``."""

from clients import fedavg, fedprox  # noqa: F401
from clients import gbme  # noqa: F401
from clients import fedlc, local_loss  # noqa: F401
