"""Run a federated config through Flower's simulation engine (Ray), one virtual node per client.

The only module that calls ``flwr.simulation``; swap the engine here. :func:`quiet_output` is the one place
that keeps Flower's, Ray's and Python's chatter off a run's output unless ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import torch

from fedlt.config import Config
from fedlt.errors import ClientFailure, FedLTError
from fedlt.federation.apps import make_client_app, make_server_app
from fedlt.interrupt import RunInterrupted


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


def check_resources(cfg: Config) -> None:
    """Refuse client resources this machine cannot give (Ray would wait for them, then fail in every actor)."""
    fed, cpus = cfg.federation, os.cpu_count() or 1
    if fed.client_cpus > cpus:
        raise FedLTError(f"config key 'federation.client_cpus' must be <= this machine's {cpus} CPUs, "
                         f"got {fed.client_cpus:g}")
    gpus = torch.cuda.device_count()
    if fed.client_gpus is not None and fed.client_gpus > gpus:
        raise FedLTError(f"config key 'federation.client_gpus' must be <= this machine's {gpus} GPUs, "
                         f"got {fed.client_gpus:g}")


def backend_config(cfg: Config, verbose: bool = False) -> dict:
    """Ray's resources per client (per host node with ``federation.hosts``); Ray logs errors only, and its
    actors' output reaches this process only when ``verbose``."""
    fed = cfg.federation
    gpus = fed.client_gpus
    if gpus is None:
        gpus = 0.0
        if torch.cuda.is_available() and cfg.device in ("auto", "cuda"):  # a host: its share of the GPUs, ≤ 1
            gpus = min(1.0, torch.cuda.device_count() / fed.hosts) if fed.hosts else 0.25
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpus},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": verbose}}


class _DropDeprecations(logging.Filter):
    """Drops Flower's "DEPRECATED FEATURE" log records (``run_simulation`` itself is one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


def _is_terminal(stream: object) -> bool:
    """Whether ``stream`` is an open terminal (a closed or replaced stream is not)."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def quiet_output(verbose: bool = False) -> Iterator[None]:
    """Within: Flower logs warnings and errors only, without its deprecation notices, and Python's warnings
    (deprecations of click, typer, torchvision …) are not shown; with ``verbose`` Flower logs everything.
    Flower's log has no ANSI colour codes where its stream is not a terminal. Ray's actors stay silent
    through :func:`backend_config` (``log_to_driver`` only when ``verbose``)."""
    from flwr.common.logger import ConsoleHandler

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    handlers = [h for h in flwr_logger.handlers if isinstance(h, ConsoleHandler)]
    colored = [h.colored for h in handlers]
    drop, client_errors = _DropDeprecations(), _ClientErrorLogs()
    for h in handlers:
        h.colored = h.colored and _is_terminal(h.stream)
    with warnings.catch_warnings():
        if not verbose:
            flwr_logger.setLevel(logging.WARNING)
            flwr_logger.addFilter(drop)
            flwr_logger.addFilter(client_errors)
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            flwr_logger.setLevel(level)
            flwr_logger.removeFilter(drop)
            flwr_logger.removeFilter(client_errors)
            for h, c in zip(handlers, colored):
                h.colored = c


def run_federated(cfg: Config, run_path: str, verbose: bool = False) -> dict:
    """Simulate ``cfg`` with Flower; return the summary. A failing client or server re-raises here, as does
    :class:`~fedlt.interrupt.RunInterrupted` (Ctrl-C): the ServerApp's thread raises it after checkpointing,
    Flower then stops the simulation runtime and re-raises it here. Ray is shut down either way."""
    from flwr.simulation import run_simulation

    check_resources(cfg)
    outcome: dict = {}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        with quiet_output(verbose):
            run_simulation(server_app=make_server_app(cfg, run_path, outcome), client_app=make_client_app(cfg),
                           num_supernodes=num_nodes(cfg), backend_config=backend_config(cfg, verbose),
                           verbose_logging=verbose)
    finally:
        shutdown_ray()
    return summary_of(outcome, "the Flower simulation ended without a result (see the log above)")


def num_nodes(cfg: Config) -> int:
    """The federation's Flower nodes: one per client, or ``federation.hosts`` host nodes."""
    return cfg.federation.hosts or cfg.partition.num_clients


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
