"""``python -m fedlt.deploy``: a deployed federation on one machine, with TLS and SuperNode authentication.

    python -m fedlt.deploy certs DIR [--nodes N] [--host NAME ...]       # a test CA, server cert, node keys
    python -m fedlt.deploy run --certs DIR [--config FILE] [--out ROOT] [--work DIR] [--port P]
                               [--host 127.0.0.1] [--allow-plugins] [--timeout S] [KEY=VALUE ...]

``run`` does what the Flower 1.42 guides ("Enable TLS connections", "Authenticate SuperNodes") do by hand:

1. ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
   --enable-supernode-auth --database WORK/state.db --host 127.0.0.1 --port P`` (one HTTPS port serves the
   Fleet, Control and Runtime APIs in 1.42), with ``FEDLT_RUN_ROOT=ROOT`` for the ServerApp (see "Trust" in
   README);
2. ``flwr supernode register node-K.pub`` for K = 0..N-1 (N = ``partition.num_clients``, or
   ``federation.hosts`` where set), through a connection ``fedlt`` written to ``WORK/flwr/config.toml``
   (``FLWR_HOME=WORK/flwr``) that trusts ``ca.crt``;
3. N × ``flower-supernode --superlink 127.0.0.1:P --root-certificates ca.crt --auth-supernode-private-key
   node-K --node-config "partition-id=K num-partitions=N"``;
4. ``flwr run APP fedlt --run-config 'config=… overrides=… out=NAME'``, then follows the run with
   ``flwr log RUN fedlt --stream`` and ``flwr ls fedlt --run-id RUN --format json`` until it finishes.

It exits 0 when the run's status is ``finished:completed`` and 1 otherwise (``flwr run`` itself exits 0 for a
failed run), 2 for bad input, and stops every process it started, also on Ctrl-C. The run directory is
``ROOT/NAME`` (NAME = the config's ``name``). Everything else (state database, logs, Flower's home with the
installed app) lands in ``WORK`` (default ``ROOT/.deploy``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlt.errors import FedLTError

CONNECTION = "fedlt"  # the SuperLink connection's name in WORK/flwr/config.toml
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the app runs in this environment, no `uv sync`
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (bind port 0 and read what the kernel chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """A one-line :class:`FedLTError` unless this machine can listen on ``host``:``port`` (0: any free port, so
    only ``host`` is tried)."""
    if not 0 <= port <= 65535:
        raise FedLTError(f"--port must be 0 (a free one) to 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise FedLTError(f"cannot listen on {host}:{port}: {reason} (choose another --host or --port)") from None


def _bin(name: str) -> str:
    """A Flower command next to this Python (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


@dataclass
class Certs:
    """The files ``python -m fedlt.deploy certs`` writes (or an operator's own, same names)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, k: int) -> Path:
        return self.folder / f"node-{k}"

    def check(self, nodes: int) -> None:
        need = [self.ca, self.cert, self.key] + [p for k in range(nodes)
                                                 for p in (self.node_key(k), self.node_key(k).with_suffix(".pub"))]
        missing = [p for p in need if not p.is_file()]
        if missing:
            raise FedLTError(f"missing certificate or key file {missing[0]}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: make test ones with "
                             f"`python -m fedlt.deploy certs {self.folder} --nodes {nodes}`")


@dataclass
class Deployment:
    """One SuperLink and its SuperNodes on this machine; every process it starts is stopped by :meth:`stop`."""

    certs: Certs
    work: Path
    run_root: Path
    host: str = "127.0.0.1"
    port: int = 0
    allow_plugins: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work = self.work.resolve()
        self.run_root = self.run_root.resolve()
        self.certs = Certs(self.certs.folder.resolve())
        if not self.port:
            self.port = free_port(self.host)
        self.address = f"{self.host}:{self.port}"
        self.flwr_home = self.work / "flwr"

    # ------------------------------------------------------------------ processes
    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(self.flwr_home), **extra}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if self.allow_plugins:
            env["FEDLT_ALLOW_PLUGINS"] = "1"
        else:
            env.pop("FEDLT_ALLOW_PLUGINS", None)
        return env

    def start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        """Start ``cmd`` in its own process group (so that stopping it also stops the ServerApp/ClientApp
        processes Flower starts under it), logging to ``WORK/NAME.log``."""
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(cmd, cwd=self.work, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
        """Send ``sig`` to process ``name``'s group, then SIGKILL what is left after ``wait`` seconds."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the group may outlive its leader (Flower's SuperExec and app processes)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            self.kill(name)

    def tail(self, name: str, lines: int = 5) -> str:
        path = self.work / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    # ------------------------------------------------------------------ the SuperLink
    def start_superlink(self, timeout: float = 120.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.run_root.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        check_port(self.host, self.port)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs.ca}"\n')
        proc = self.start("superlink", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
            "--ssl-keyfile", str(self.certs.key), "--enable-supernode-auth", "--database", str(self.work / "state.db"),
            "--host", self.host, "--port", str(self.port), "--disable-runtime-dependency-installation"],
            FEDLT_RUN_ROOT=str(self.run_root))
        self._wait_healthy(proc, timeout)

    def _wait_healthy(self, proc: subprocess.Popen, timeout: float) -> None:
        """Wait until the SuperLink answers ``/health`` over TLS (checked against ``ca.crt``)."""
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.certs.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FedLTError(f"flower-superlink exited with status {proc.returncode}: "
                                 f"{self.tail('superlink', 1)} (log: {self.work / 'superlink.log'})")
            try:
                with urllib.request.urlopen(f"https://{self.address}/health", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise FedLTError(f"the SuperLink did not answer on https://{self.address} within {timeout:.0f} s "
                         f"(log: {self.work / 'superlink.log'})")

    def flwr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """One ``flwr`` CLI command against this SuperLink."""
        return subprocess.run([_bin("flwr"), *args], check=False, cwd=self.work, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def register(self, keys: list[Path]) -> None:
        """``flwr supernode register KEY.pub`` for each key (the SuperLink operator's step), all at once."""
        procs = [subprocess.Popen([_bin("flwr"), "supernode", "register", str(k.with_name(k.name + ".pub")),
                                   CONNECTION, "--format", "json"], cwd=self.work, env=self.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  stdin=subprocess.DEVNULL) for k in keys]
        for key, p in zip(keys, procs):
            out, _ = p.communicate(timeout=300)
            if p.returncode != 0 or '"success": true' not in out:
                raise FedLTError(f"could not register {key}.pub with the SuperLink: {_last_line(out)}")

    # ------------------------------------------------------------------ SuperNodes
    def start_node(self, k: int, num_partitions: int, key: Path | None = None,
                   gpu: int | None = None) -> subprocess.Popen:
        """SuperNode ``node-K`` holding partition K (or, with ``federation.hosts``, host K of ``num_partitions``
        hosts: :func:`fedlt.federation.hosts.hosted_partitions`), authenticated by ``key`` (default: the certs'
        node-K), seeing only GPU ``gpu`` (``CUDA_VISIBLE_DEVICES``) where given, else every GPU."""
        key = key or self.certs.node_key(k)
        env = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": str(gpu)}
        return self.start(f"node-{k}", [
            _bin("flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.certs.ca),
            "--auth-supernode-private-key", str(key), "--node-config", f"partition-id={k} num-partitions={num_partitions}",
            "--host", "127.0.0.1", "--port", str(free_port())], **env)

    # ------------------------------------------------------------------ runs
    def submit(self, app: Path, run_config: dict[str, str]) -> int:
        """``flwr run APP fedlt --run-config …``; returns the run id."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        res = self.flwr("run", str(app), CONNECTION, "--format", "json", "--run-config", rc)
        try:
            out = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            out = {}
        if res.returncode != 0 or not out.get("success"):
            raise FedLTError(f"flwr run failed: {_last_line(res.stdout + res.stderr)}")
        return int(out["run-id"])

    def status(self, run_id: int) -> dict:
        """The run's row of ``flwr ls --run-id RUN --format json`` (``status`` is e.g. ``finished:failed``)."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=120)
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])["runs"][0]
        except (ValueError, KeyError, IndexError):
            return {"status": "unknown", "status-details": _last_line(res.stdout + res.stderr)}

    def follow(self, run_id: int, timeout: float, poll: float = 5.0, stream: bool = True) -> dict:
        """Stream the run's log to stdout until its status is ``finished:*``; return its final row."""
        log = (subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], cwd=self.work,
                                env=self.env(), stdin=subprocess.DEVNULL, start_new_session=True)
               if stream else None)
        if log is not None:
            self.procs["log"] = log
        deadline = time.monotonic() + timeout
        try:
            while True:
                row = self.status(run_id)
                if str(row.get("status", "")).startswith("finished"):
                    return row
                if time.monotonic() > deadline:
                    self.flwr("stop", str(run_id), CONNECTION, timeout=60)
                    raise FedLTError(f"run {run_id} did not finish within {timeout:.0f} s (stopped it; "
                                     f"raise --timeout); last status: {row.get('status')}")
                time.sleep(poll)
        finally:
            if log is not None:
                time.sleep(1.0 if log.poll() is None else 0)  # the last log lines
                self.kill("log", wait=2)


def host_gpus(hosts: int) -> list[int | None]:
    """The GPU each of ``hosts`` host nodes on this machine sees: host k GPU k mod G with G > 1 GPUs (so that
    hosts spread over the cards instead of all training on the first), else None (no restriction)."""
    import torch

    count = torch.cuda.device_count()
    return [k % count if count > 1 else None for k in range(hosts)]


BOX = "─│╭╮╰╯┌┐└┘├┤┬┴┼━┃ "  # the frame of Flower's boxed messages


def _last_line(text: str) -> str:
    """The last line of a command's output that says something: not blank, not a line of a box's frame (Flower
    prints its errors in a box; its last line is the bottom border), with a box's side bars taken off."""
    lines = [ln.strip().strip("│┃").strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set(BOX)]
    return lines[-1] if lines else "(no output)"


def deploy(args: argparse.Namespace) -> int:
    """``run``: start everything, submit, follow; 0 when the run completed, 1 when it failed."""
    from fedlt.config import load_config
    from fedlt.federation.apps import one_federated_run

    if not args.timeout > 0:  # (NaN too: the run would never be stopped)
        raise FedLTError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    cfg = load_config(args.config, args.overrides)
    if cfg.mode == "both":  # the default config's mode; a deployment runs the federated part
        args.overrides = [*args.overrides, "mode=federated"]
        cfg = cfg.replace(mode="federated")
    n = cfg.federation.hosts or cfg.partition.num_clients
    if args.nodes is not None and args.nodes != n:
        per = (f"federation.hosts={n}: one SuperNode per host" if cfg.federation.hosts
               else f"partition.num_clients={n}: one SuperNode per partition")
        raise FedLTError(f"--nodes {args.nodes} differs from {per}")
    if cfg.mode != "federated":
        raise FedLTError(f"a deployment runs a federated config, got mode={cfg.mode}")
    one_federated_run(cfg, "a deployment")  # (a sweep: refused here, before anything starts)
    if cfg.plugins and not args.allow_plugins:
        raise FedLTError(f"the config names plug-ins {cfg.plugins}: pass --allow-plugins to let the ServerApp and "
                         f"ClientApps import them")
    app = Path(args.app).resolve()
    if not (app / "pyproject.toml").is_file():
        raise FedLTError(f"--app {app} holds no pyproject.toml (a Flower app folder)")
    config = ""
    if args.config:
        config_path = Path(args.config).resolve()
        if not config_path.is_relative_to(app):
            raise FedLTError(f"--config {args.config} must lie inside the app folder {app} (the run ships that folder)")
        config = str(config_path.relative_to(app))
    certs = Certs(Path(args.certs).resolve())  # (the flwr commands run in the work folder: a relative path breaks)
    certs.check(n)
    check_port(args.host, args.port)
    root = Path(args.out)
    d = Deployment(certs, Path(args.work) if args.work else root / ".deploy", root, args.host, args.port,
                   args.allow_plugins)
    try:
        print(f"deploy: SuperLink on https://{d.address} (TLS, SuperNode authentication, state {d.work}/state.db)",
              flush=True)
        d.start_superlink()
        d.register([certs.node_key(k) for k in range(n)])
        gpus = host_gpus(n) if cfg.federation.hosts else [None] * n
        for k in range(n):
            d.start_node(k, n, gpu=gpus[k])
        if any(g is not None for g in gpus):
            print(f"deploy: host k sees GPU k mod {max(gpus) + 1} (CUDA_VISIBLE_DEVICES)", flush=True)
        hosting = f" (hosts, {cfg.partition.num_clients} partitions among them)" if cfg.federation.hosts else ""
        print(f"deploy: {n} SuperNodes{hosting} registered and started; submitting the run", flush=True)
        run_id = d.submit(app, {"config": config, "overrides": shlex.join(args.overrides), "out": cfg.name})
        row = d.follow(run_id, args.timeout, stream=not args.quiet)
    finally:
        d.stop()
    status = row.get("status")
    run_dir = d.run_root / cfg.name
    if status != "finished:completed":
        print(f"error: run {run_id} {status}: {row.get('status-details') or '(no details)'} "
              f"(logs: {d.work})", file=sys.stderr)
        return 1
    print(f"deploy: run {run_id} {status}; run directory {run_dir}", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt.deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certs", help="write a test CA, a server certificate for 127.0.0.1/localhost and node keys")
    c.add_argument("folder")
    c.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs node-0 .. node-(N-1) (default 2)")
    c.add_argument("--host", action="append", default=[], help="another name or address the certificate covers")
    r = sub.add_parser("run", help="start a SuperLink (TLS, node auth, state db) and the SuperNodes; run; stop")
    r.add_argument("--certs", required=True, help="folder with ca.crt, server.pem, server.key, node-K(.pub)")
    r.add_argument("--config", default=None, help="YAML config inside the app folder (default: fedlt's defaults)")
    r.add_argument("--out", default="runs/deploy", help="the server's run root; the run lands in OUT/<config name>")
    r.add_argument("--work", default=None, help="state database, logs, Flower home (default OUT/.deploy)")
    r.add_argument("--app", default=".", help="the Flower app folder submitted (default: .)")
    r.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (default 127.0.0.1)")
    r.add_argument("--port", type=int, default=0, help="its port (default: a free one)")
    r.add_argument("--nodes", type=int, default=None,
                   help="check: must equal partition.num_clients (federation.hosts where set)")
    r.add_argument("--allow-plugins", action="store_true", help="let submitted runs import `plugins:` modules")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped (default 3600)")
    r.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    r.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        if args.command == "certs":
            from fedlt.deploy_certs import make_certs

            out = make_certs(args.folder, args.nodes, tuple(args.host))
            print(f"wrote ca.crt, server.pem (127.0.0.1, localhost{''.join(', ' + h for h in args.host)}), "
                  f"server.key and node-0..node-{args.nodes - 1} key pairs to {out}")
            return 0
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the deployment like Ctrl-C does
        return deploy(args)
    except FedLTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deploy: interrupted; every process it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
