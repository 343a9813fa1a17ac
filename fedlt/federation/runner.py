"""Run a federated config through Flower's simulation engine (Ray), one virtual node per client.

The only module that calls ``flwr.simulation``; swap the engine here.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from fedlt.config import Config
from fedlt.errors import ClientFailure, FedLTError
from fedlt.federation.apps import make_client_app, make_server_app


class _ClientErrorLogs(logging.Filter):
    """Drops the ERROR lines Flower's simulation engine logs for each failing client (the exception, its Ray
    traceback, "An exception was raised when processing a message by RayBackend"): the same error reaches the
    server as the client's error reply, which fedlt reports once (the warning of a tolerated failure, or the
    error that ends the run). Shown with ``--verbose``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        text = str(record.msg)
        return not (isinstance(record.msg, BaseException) or "fedlt-client-error" in text
                    or "ClientAppException" in text or "RayTaskError" in text
                    or text.startswith("An exception was raised when processing a message by"))


def backend_config(cfg: Config) -> dict:
    fed = cfg.federation
    gpus = fed.client_gpus
    if gpus is None:
        gpus = 0.25 if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else 0.0
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpus},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": True}}


def run_federated(cfg: Config, run_path: str, verbose: bool = False) -> dict:
    """Simulate ``cfg`` with Flower; return the summary. A failing client or server re-raises here."""
    from flwr.simulation import run_simulation

    outcome: dict = {}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    quiet = _ClientErrorLogs()
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=make_server_app(cfg, run_path, outcome), client_app=make_client_app(cfg),
                           num_supernodes=cfg.partition.num_clients, backend_config=backend_config(cfg),
                           verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(quiet)
    return summary_of(outcome, "the Flower simulation ended without a result (see the log above)")


def summary_of(outcome: dict, missing: str) -> dict:
    """The summary the ServerApp recorded in ``outcome``; its error re-raised (fedlt's own errors as they are,
    anything else with the server's traceback); ``missing`` when it recorded neither."""
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, (ClientFailure, FedLTError)):
            raise exc
        raise RuntimeError(f"federated run failed:\n{outcome['traceback']}") from exc
    if "summary" not in outcome:
        raise RuntimeError(missing)
    return outcome["summary"]
