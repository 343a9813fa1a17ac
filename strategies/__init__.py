"""Server-strategy plug-ins: one file each, registered by name with ``@STRATEGIES.register``."""

from strategies import fedavg, fedavgm, fedprox  # noqa: F401
from strategies import gbme  # noqa: F401
