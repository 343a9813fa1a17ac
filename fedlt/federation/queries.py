"""Client computations a strategy may ask any client for, whatever its training objective.

A strategy asks with ``FedLTStrategy.query(grid, pids, arrays, action, config)``; the ClientApp loads the
received weights and runs ``QUERIES.get(action)(cfg, model, data, config, generator, augment)`` on the
client's own data, returning a :class:`~fedlt.client_method.FitResult` whose tensors the reply moves to the
CPU. A plug-in registers its computation beside its strategy::

    @QUERIES.register("feature-stats")   # strategies/ccvr.py
    def feature_stats(cfg, model, data, config, generator, augment) -> FitResult: ...

The built-in ones: ``prior-epoch`` (strategies/gbme/prior.py), ``feature-stats`` (strategies/ccvr.py),
``class-grads`` (strategies/creff.py). An action no query answers goes to the client method's ``query``.
"""

from __future__ import annotations

from fedlt.registry import Registry

QUERIES: Registry = Registry("client query", "client queries")
