"""Flower ClientApp and ServerApp factories.

In simulation (:mod:`fedlt.federation.runner`) the config travels inside the apps' closures. Under
``flwr run .`` or a deployed SuperLink the module-level ``client_app`` / ``server_app`` read it from the
run config: ``config`` (a YAML path), ``overrides`` (space-separated KEY=VALUE) and ``out``.

Those three come from whoever submits the run, so they are read as untrusted input (README, "Trust"):

- ``config`` names a YAML file inside the app (the submitted FAB's folder), never one elsewhere on the server;
- ``out`` is a folder under the server's run root (``$FEDLT_RUN_ROOT``, else the ServerApp's working
  directory): an absolute path outside it or a ``..`` that climbs out of it is refused;
- ``plugins:`` (modules to import) are refused unless the process that reads the config allows them with
  ``FEDLT_ALLOW_PLUGINS=1`` (the SuperLink's operator for the ServerApp, each node's operator for its
  ClientApp; ``python -m fedlt.deploy --allow-plugins`` sets it for both).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import (
    Config,
    config_from_dict,
    parse_override,
    read_config_file,
    resolve,
    set_dotted,
)
from fedlt.device import resolve_device
from fedlt.errors import FedLTError
from fedlt.experiment import augment_for, experiment_for, model_for
from fedlt.federation.dp import client_clipping_mod
from fedlt.federation.records import load_into, metric_record, to_arrays, to_state
from fedlt.federation.strategy import CLIENT_ERROR
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, seeded_rng, torch_generator

# A client's error travels to the server inside these markers (whatever the engine wraps around it: Flower's
# ClientAppException, Ray's RayTaskError), so the server can name the partition and show the traceback once.
ERROR_BEGIN, ERROR_END = "<<fedlt-client-error ", " fedlt-client-error>>"


class InjectedFailure(RuntimeError):
    """A client failure drawn from ``federation.failure_rate`` (:func:`injected_failure`)."""


def injected_failure(cfg: Config, server_round: int, pid: int) -> bool:
    """Whether client ``pid`` fails in ``server_round``: a draw u ~ U[0, 1) from the generator seeded by
    (seed, ``Stream.FAILURE``, round, partition id), failing when u < ``federation.failure_rate``; the same
    in every engine and on resume."""
    rate = cfg.federation.failure_rate
    return rate > 0 and seeded_rng(cfg.seed, Stream.FAILURE, server_round, pid).random() < rate


def client_error(pid: int, exc: BaseException) -> RuntimeError:
    """The exception a failing ClientApp raises: the partition id, the error's first line and its traceback
    between :data:`ERROR_BEGIN` and :data:`ERROR_END` (parsed by :func:`fedlt.federation.strategy.parse_error`)."""
    line = traceback.format_exception_only(type(exc), exc)[0].strip()
    return RuntimeError(f"{ERROR_BEGIN}{pid}\n{line}\n{traceback.format_exc()}{ERROR_END}")


@lru_cache(maxsize=4)
def _config(data: str) -> Config:
    return config_from_dict(json.loads(data))


RUN_ROOT_ENV = "FEDLT_RUN_ROOT"
ALLOW_PLUGINS_ENV = "FEDLT_ALLOW_PLUGINS"


def app_dir() -> Path:
    """The folder of the running app: the one that holds this ``fedlt`` package (under ``flwr run`` the
    installed FAB, i.e. what the submitter sent)."""
    return Path(__file__).resolve().parents[2]


def run_root() -> Path:
    """The server's run root: ``$FEDLT_RUN_ROOT`` (set by the SuperLink's operator), else the working directory."""
    return Path(os.environ.get(RUN_ROOT_ENV) or os.getcwd()).resolve()


def _inside(root: Path, given: str, key: str, where: str) -> Path:
    path = (root / given).resolve()  # an absolute ``given`` replaces ``root``; ``..`` and links are resolved
    if not path.is_relative_to(root):
        raise FedLTError(f"run config '{key}' = {given!r} is outside {where} {root}: a submitted run may only "
                         f"name paths under it")
    return path


def plugins_allowed() -> bool:
    return os.environ.get(ALLOW_PLUGINS_ENV, "") == "1"


def config_from_context(context: Context) -> Config:
    """The config a submitted run names: ``config`` (a YAML file inside the app) <- ``overrides``.

    ``plugins:`` (modules this process would import) are refused unless ``FEDLT_ALLOW_PLUGINS=1`` here."""
    rc = context.run_config
    given = str(rc.get("config") or "")
    raw: dict = {}
    if given:  # the file and each of its bases inside the app folder
        inside = functools.partial(_inside, app_dir(), key="config", where="the app folder")
        raw = read_config_file(inside(given), check_base=lambda base: inside(str(base)))
    for item in shlex.split(str(rc.get("overrides", ""))):
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    if raw.get("plugins") and not plugins_allowed():
        raise FedLTError(f"the submitted run names plug-ins {raw['plugins']!r}, and this process does not import "
                         f"submitted plug-ins (its operator may allow them with {ALLOW_PLUGINS_ENV}=1)")
    return one_federated_run(resolve(raw), "a submitted Flower run")


def one_federated_run(cfg: Config, how: str) -> Config:
    """The one federated run that ``how`` (a Flower run, a deployment) trains from ``cfg``: ``mode=both`` (the
    default) is its federated run; a centralized config or a sweep is refused in one line (a sweep in the config
    was silently not run: only its base values were)."""
    if cfg.sweep:
        raise FedLTError(f"{how} trains one config, and this one lists a sweep over {', '.join(cfg.sweep)}: add "
                         f"sweep={{}} to the overrides (and the value you want, e.g. "
                         f"{next(iter(cfg.sweep))}=...), or run the sweep with python -m fedlt.simulate")
    if cfg.mode == "centralized":
        raise FedLTError(f"{how} trains a federated run, and the config says mode=centralized: run it with "
                         f"python -m fedlt.simulate")
    return cfg.replace(mode="federated") if cfg.mode == "both" else cfg


def out_from_context(context: Context) -> Path:
    """The run directory a submitted run names: ``out`` under :func:`run_root` (default ``runs``)."""
    return _inside(run_root(), str(context.run_config.get("out") or "runs"), "out", "the run root")


def _reply(msg: Message, result: FitResult, pid: int) -> Message:
    """The client's reply: every tensor of ``result`` leaves through :func:`~fedlt.federation.records.to_arrays`
    (detached, on the CPU), whatever device the computation ran on."""
    content = RecordDict({"arrays": to_arrays(result.state),
                          "metrics": metric_record({**result.metrics, "partition-id": pid})})
    for key, arrays in result.extra_arrays.items():
        content[key] = to_arrays(arrays)
    return Message(content=content, reply_to=msg)


def message_config(msg: Message) -> dict:
    """A client message's config as a dict, with the client's own records (every ArrayRecord but the global
    ``arrays``, :meth:`fedlt.federation.strategy.FedLTStrategy.client_records`) as state dicts under
    ``config["records"]`` where there are any."""
    config = dict(msg.content["config"])
    records = {k: to_state(v) for k, v in msg.content.array_records.items() if k != "arrays"}
    if records:
        config["records"] = records
    return config


@contextmanager
def client_errors(msg: Message, context: Context) -> Iterator[None]:
    """Mark a :class:`FedLTError` raised on a client (bad data, a non-finite loss) with :data:`CLIENT_ERROR`,
    the partition id and the round, so that the server ends the run with its one line
    (:meth:`fedlt.federation.strategy.FedLTStrategy.check_replies`) instead of a client failure."""
    try:
        yield
    except FedLTError as exc:
        pid = context.node_config.get("partition-id")
        config = msg.content.config_records.get("config") or {}
        server_round = int(config.get("server-round", 0))
        when = f"round {server_round}" if server_round else "the set-up round"
        raise FedLTError(f"{CLIENT_ERROR}partition {pid}, {when}: {str(exc).splitlines()[0]}") from None


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp that holds partition ``node_config['partition-id']`` of the experiment and trains on it
    (with ``federation.hosts``, a host node holding a share of the partitions: :mod:`fedlt.federation.hosts`).

    The config travels as plain data and is validated again in the client's process (where the plug-ins it
    names are imported first), so no plug-in class needs to be importable before that."""
    app = ClientApp(mods=[client_clipping_mod])  # clips train replies only when the strategy asks (DP)
    data = None if cfg is None else json.dumps(cfg.model_dump(mode="json"))

    def config_of(context: Context) -> Config:
        return _config(data) if data is not None else config_from_context(context)

    def setup(msg: Message, context: Context):
        c = config_of(context)
        torch.set_num_threads(max(1, int(c.federation.client_cpus)))
        pid = int(context.node_config["partition-id"])
        exp = experiment_for(c)
        device = resolve_device(c.device)
        model = model_for(c, exp).to(device)
        if "arrays" in msg.content:
            load_into(model, msg.content["arrays"])
        method: ClientMethod = CLIENTS.get(c.client.name)(c)
        config = message_config(msg)
        gen = torch_generator(c.seed, Stream.CLIENT, int(config.get("server-round", 0)), pid)
        return c, pid, exp.client_data(pid, device), model, method, config, gen

    def fit(msg: Message, context: Context) -> Message:
        with client_errors(msg, context):
            c, pid, data, model, method, config, gen = setup(msg, context)
            server_round = int(config.get("server-round", 0))
            if injected_failure(c, server_round, pid):
                raise InjectedFailure(f"injected failure of partition {pid} in round {server_round} "
                                      f"(federation.failure_rate={c.federation.failure_rate:g})")
            t0 = time.perf_counter()
            result = method.fit(model, data, config, gen, augment_for(c, data))
        result.metrics["fit_seconds"] = time.perf_counter() - t0
        return _reply(msg, result, pid)

    def answer(msg: Message, context: Context) -> Message:
        config = dict(msg.content["config"])
        if config["action"] == "partition-id":
            pid = int(context.node_config["partition-id"])
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
        import fedlt.federation.local_eval  # noqa: F401  (registers the core query ``local-eval``)
        from fedlt.federation.queries import (
            QUERIES,  # computations every client answers (prior, features …)
        )

        with client_errors(msg, context):
            c, pid, data, model, method, config, gen = setup(msg, context)
            if config["action"] in QUERIES:
                result = QUERIES.get(config["action"])(c, model, data, config, gen, augment_for(c, data))
            else:
                result = method.query(config["action"], model, data, config, gen, augment_for(c, data))
        return _reply(msg, result, pid)

    def hosting(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        """``handler`` on a partition's own messages; a host node's messages (``federation.hosts``: a packed
        message, the query for the partitions it holds) to :func:`fedlt.federation.hosts.answer_hosted`,
        which calls this app on each part. A host's own error names the host (there is no one partition)."""
        @functools.wraps(handler)
        def route(msg: Message, context: Context) -> Message:
            from fedlt.federation.hosts import answer_hosted, is_host_message

            if not is_host_message(msg):
                return handler(msg, context)
            try:
                return answer_hosted(config_of(context), app, msg, context)
            except FedLTError as exc:
                where = f"host {context.node_config.get('partition-id')}"
                raise FedLTError(f"{CLIENT_ERROR}{where}: {str(exc).splitlines()[0]}") from None
        return route

    app.train()(hosting(reported(fit)))
    app.query()(hosting(reported(answer)))
    return app


def reported(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """``handler`` with any exception it raises re-raised as :func:`client_error` (the partition id, the
    error's first line and its traceback), the one form a failing ClientApp reports in."""
    @functools.wraps(handler)
    def reply(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            raise client_error(int(context.node_config["partition-id"]), exc) from exc
    return reply


def make_server_app(cfg: Config | None = None, out: str | None = None, outcome: dict | None = None) -> ServerApp:
    """A ServerApp that runs the federated rounds into ``<out>/<run name>``; errors land in ``outcome``."""
    from fedlt.federation.server import run_rounds
    from fedlt.rundir import RunDir

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg or config_from_context(context)
        path = out or out_from_context(context)
        if c.federation.hosts:  # the strategies address one (virtual) node per partition
            from fedlt.federation.hosts import HostedGrid

            grid = HostedGrid(grid, c.federation.hosts, c.partition.num_clients, c.federation.discovery_timeout)
        try:
            summary = run_rounds(grid, c, RunDir(path))
            if outcome is not None:
                outcome["summary"] = summary
        except BaseException as exc:
            if outcome is not None:
                outcome["error"] = exc
                outcome["traceback"] = traceback.format_exc()
            raise

    return app


client_app = make_client_app()
server_app = make_server_app()
