"""Run a federated config through Flower's simulation engine (Ray), one virtual node per client.

The only module that calls ``flwr.simulation``; swap the engine here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.federation.apps import make_client_app, make_server_app
from fedlt.federation.strategy import ClientFailure
from fedlt.interrupt import RunInterrupted


def backend_config(cfg: Config) -> dict:
    fed = cfg.federation
    gpus = fed.client_gpus
    if gpus is None:
        gpus = 0.25 if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else 0.0
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpus},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": True}}


def run_federated(cfg: Config, run_path: str, verbose: bool = False) -> dict:
    """Simulate ``cfg`` with Flower; return the summary. A failing client or server re-raises here, as does
    :class:`~fedlt.interrupt.RunInterrupted` (Ctrl-C): the ServerApp's thread raises it after checkpointing,
    Flower then stops the simulation runtime and re-raises it here. Ray is shut down either way."""
    from flwr.simulation import run_simulation

    outcome: dict = {}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=make_server_app(cfg, run_path, outcome), client_app=make_client_app(cfg),
                           num_supernodes=cfg.partition.num_clients, backend_config=backend_config(cfg),
                           verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        shutdown_ray()
    return summary_of(outcome, "the Flower simulation ended without a result (see the log above)")


def shutdown_ray() -> None:
    """``ray.shutdown()`` where Ray is still initialised in this process (Flower's backend shuts it down when
    the simulation ends normally; not when it fails or is interrupted before the backend is built)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def summary_of(outcome: dict, missing: str) -> dict:
    """The summary the ServerApp recorded in ``outcome``; its error re-raised (fedlt's own errors as they are,
    anything else with the server's traceback); ``missing`` when it recorded neither."""
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, (ClientFailure, FedLTError, RunInterrupted)):
            raise exc
        raise RuntimeError(f"federated run failed:\n{outcome['traceback']}") from exc
    if "summary" not in outcome:
        raise RuntimeError(missing)
    return outcome["summary"]
