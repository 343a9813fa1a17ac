"""The deployed mode: what a submitted run may name (trust rules), ``python -m fedlt.deploy``'s refusals and
certificates, and (slow) a real SuperLink with TLS and SuperNode authentication on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedlt.config import load_config
from fedlt.deploy import Certs, Deployment, main
from fedlt.deploy_certs import make_certs
from fedlt.errors import FedLTError
from fedlt.federation.apps import app_dir, config_from_context, out_from_context

ROOT = Path(__file__).resolve().parents[1]


def ctx(**run_config) -> Context:
    return Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


# ------------------------------------------------------------------ trust: what a submitted run may name

def test_app_dir_is_the_folder_that_holds_the_package():
    assert (app_dir() / "fedlt" / "federation" / "apps.py").is_file()


def test_submitted_config_is_read_from_inside_the_app():
    cfg = config_from_context(ctx(config="configs/default.yaml", overrides="federation.rounds=3 sweep={}"))
    assert cfg.name == "default" and cfg.federation.rounds == 3 and cfg.mode == "federated"  # (mode both: its FL run)


def test_a_submitted_config_builds_on_its_base():
    """configs/cifar100_lt.yaml gives only what differs from cifar10_lt.yaml (``base:``): it was refused as
    'unknown config key base'."""
    cfg = config_from_context(ctx(config="configs/cifar100_lt.yaml", overrides="sweep={}"))
    assert cfg.data.name == "cifar100" and cfg.model.name == load_config("configs/cifar100_lt.yaml").model.name


def test_a_submitted_sweep_or_centralized_config_is_refused():
    """A Flower run trains one federated config: a sweep in it was silently not run (only its base values were)."""
    with pytest.raises(FedLTError, match=r"^a submitted Flower run trains one config, and this one lists a sweep "
                                         r"over strategy.name: add sweep=\{\} to the overrides"):
        config_from_context(ctx(config="configs/default.yaml", overrides="mode=federated"))
    with pytest.raises(FedLTError, match="says mode=centralized"):
        config_from_context(ctx(overrides="mode=centralized"))


def test_a_base_outside_the_app_is_refused(tmp_path, monkeypatch):
    from fedlt.federation import apps

    monkeypatch.setattr(apps, "app_dir", lambda: tmp_path / "app")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "run.yaml").write_text("base: ../outside.yaml\n")
    (tmp_path / "outside.yaml").write_text("name: outside\n")
    with pytest.raises(FedLTError, match=r"run config 'config' = .*outside.yaml' is outside the app folder"):
        config_from_context(ctx(config="run.yaml"))
    (tmp_path / "app" / "base.yaml").write_text("name: inside\n")
    (tmp_path / "app" / "run.yaml").write_text("base: base.yaml\n")
    assert config_from_context(ctx(config="run.yaml")).name == "inside"


@pytest.mark.parametrize("given", ["/etc/passwd", "../../../etc/hosts", "configs/../../x.yaml"])
def test_submitted_config_outside_the_app_is_refused(given):
    with pytest.raises(FedLTError, match=r"run config 'config' = .* is outside the app folder"):
        config_from_context(ctx(config=given))


def test_submitted_plugins_are_refused_unless_the_process_allows_them(monkeypatch):
    monkeypatch.delenv("FEDLT_ALLOW_PLUGINS", raising=False)
    with pytest.raises(FedLTError, match=r"names plug-ins \['json'\].*FEDLT_ALLOW_PLUGINS=1"):
        config_from_context(ctx(overrides="plugins=[json]"))
    monkeypatch.setenv("FEDLT_ALLOW_PLUGINS", "1")
    assert config_from_context(ctx(overrides="plugins=[json]")).plugins == ["json"]


def test_out_stays_under_the_run_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLT_RUN_ROOT", str(tmp_path))
    assert out_from_context(ctx(out="a/b")) == tmp_path.resolve() / "a" / "b"
    assert out_from_context(ctx(out=str(tmp_path / "c"))) == tmp_path.resolve() / "c"  # absolute, but inside
    assert out_from_context(ctx()) == tmp_path.resolve() / "runs"
    for bad in ["../escape", "/tmp/elsewhere", "a/../../escape"]:
        with pytest.raises(FedLTError, match=r"run config 'out' = .* is outside the run root"):
            out_from_context(ctx(out=bad))
    (tmp_path / "link").symlink_to("/")  # a link inside the root that points out of it is outside too
    with pytest.raises(FedLTError, match="outside the run root"):
        out_from_context(ctx(out="link/tmp"))


def test_out_defaults_to_the_working_directory_as_root(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDLT_RUN_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert out_from_context(ctx(out="runs/flwr")) == tmp_path.resolve() / "runs" / "flwr"
    with pytest.raises(FedLTError, match="outside the run root"):
        out_from_context(ctx(out=".."))


# ------------------------------------------------------------------ certificates

@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), nodes=3)


def test_server_certificate_is_trusted_for_127_0_0_1_and_localhost(certs):
    """A real TLS handshake: a server with server.pem/server.key, a client that trusts only ca.crt and checks
    the host name (as flower-supernode and flwr do)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            for _ in range(3):
                conn, _ = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

        threading.Thread(target=serve, daemon=True).start()
        for name in ["127.0.0.1", "localhost"]:
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() is not None
                tls.send(b"x")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"), \
                socket.create_connection(("127.0.0.1", port)) as raw:
            client_ctx.wrap_socket(raw, server_hostname="example.org")


def test_node_keys_are_what_flower_registers(certs):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(certs / "node-0.pub")  # P-384 OpenSSH public key, as `flwr supernode register`
    assert load_ssh_private_key((certs / "node-0").read_bytes(), None)  # as --auth-supernode-private-key
    assert (certs / "node-0").stat().st_mode & 0o077 == 0 and (certs / "ca.key").stat().st_mode & 0o077 == 0


def test_certs_are_never_replaced(certs, capsys):
    assert main(["certs", str(certs)]) == 2
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input: one line, status 2

@pytest.fixture
def run_deploy(capsys, monkeypatch):
    """``python -m fedlt.deploy ARGS`` in this process: (exit status, stderr)."""
    monkeypatch.chdir(ROOT)

    def run(*args: str) -> tuple[int, str]:
        status = main(list(args))
        return status, capsys.readouterr().err

    return run


def one_line_error(res: tuple[int, str], pattern: str) -> None:
    import re

    status, err = res
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def test_a_flower_error_box_is_said_by_its_message_not_its_border():
    from fedlt.deploy import _last_line

    box = ("╭──────────────── Error ────────────────╮\n│ Node public key file not found: x.pub │\n"
           "╰───────────────────────────────────────╯\n")
    assert _last_line(box) == "Node public key file not found: x.pub"
    assert _last_line("one\ntwo\n\n") == "two" and _last_line("  \n") == "(no output)"


def test_missing_certificates_are_refused(run_deploy, tmp_path):
    one_line_error(run_deploy("run", "--certs", str(tmp_path / "none"), "--out", str(tmp_path)),
                   r"^error: missing certificate or key file .*ca.crt .*python -m fedlt.deploy certs")


def test_a_missing_node_key_is_refused(run_deploy, certs, tmp_path):
    one_line_error(run_deploy("run", "--certs", str(certs), "--out", str(tmp_path), "partition.num_clients=4"),
                   r"missing certificate or key file .*node-3")


def test_nodes_must_equal_num_clients(run_deploy, certs, tmp_path):
    one_line_error(run_deploy("run", "--certs", str(certs), "--out", str(tmp_path), "--nodes", "3",
                              "partition.num_clients=2"), r"--nodes 3 differs from partition.num_clients=2")


def test_nodes_must_equal_hosts_where_set(run_deploy, certs, tmp_path):
    one_line_error(run_deploy("run", "--certs", str(certs), "--out", str(tmp_path), "--nodes", "4",
                              "partition.num_clients=4", "federation.hosts=2"),
                   r"--nodes 4 differs from federation.hosts=2: one SuperNode per host")


def test_host_nodes_spread_over_the_gpus(certs, tmp_path, monkeypatch):
    """Host k of a deployment on a machine with G > 1 GPUs sees GPU k mod G only; with one GPU or none, every
    node sees what the machine has."""
    import torch

    from fedlt.deploy import host_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert host_gpus(5) == [0, 1, 2, 0, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert host_gpus(2) == [None, None]
    started = {}
    monkeypatch.setattr(Deployment, "start", lambda self, name, cmd, **env: started.setdefault(name, env))
    d = Deployment(Certs(certs), tmp_path / "work", tmp_path / "runs")
    d.start_node(0, 2, gpu=1)
    d.start_node(1, 2)
    assert started == {"node-0": {"CUDA_VISIBLE_DEVICES": "1"}, "node-1": {}}


def test_a_port_in_use_is_refused(run_deploy, certs, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        one_line_error(run_deploy("run", "--certs", str(certs), "--out", str(tmp_path), "--port", str(port),
                                  "partition.num_clients=2"), rf"cannot listen on 127.0.0.1:{port}")


def test_a_bad_config_value_is_refused_before_anything_starts(run_deploy, certs, tmp_path):
    one_line_error(run_deploy("run", "--certs", str(certs), "--out", str(tmp_path), "federation.rounds=0"),
                   r"config key 'federation.rounds'")
    assert not (tmp_path / ".deploy").exists()


def test_plugins_need_allow_plugins(run_deploy, certs, tmp_path):
    one_line_error(run_deploy("run", "--certs", str(certs), "--out", str(tmp_path), "partition.num_clients=2",
                              "plugins=[json]"), r"names plug-ins \['json'\]: pass --allow-plugins")


# ------------------------------------------------------------------ a real deployment (slow)

TINY = ["mode=federated", "partition.num_clients=2", "federation.rounds=2", "federation.fraction=1",
        "train.local_steps=2", "eval.batch_size=10000", "eval.every=2"]


@pytest.mark.slow
@pytest.mark.heavy  # (the next test runs TLS + node auth in make test / CI; this one the command line around it)
def test_deployment_with_tls_and_node_auth(certs, tmp_path):
    """``python -m fedlt.deploy run`` end to end: TLS, 2 authenticated SuperNodes, 2 rounds; exit 0 and the run
    directory's summary; every process stopped afterwards."""
    relative = os.path.relpath(certs, ROOT)  # (as README's `--certs certs`: the flwr commands run in another folder)
    res = subprocess.run([sys.executable, "-m", "fedlt.deploy", "run", "--certs", relative, "--out", str(tmp_path),
                          "--quiet", "--timeout", "900", "name=tls", *TINY], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "finished:completed" in res.stdout
    summary = json.loads((tmp_path / "tls" / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["rounds"] == 2
    assert 0.0 <= summary["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "tls" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("round") for r in rows][-1] == 2
    assert (tmp_path / ".deploy" / "state.db").is_file()
    log = (tmp_path / ".deploy" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in log  # TLS, and only on 127.0.0.1
    assert "activate-node HTTP/1.1\" 200" in log  # the registered keys were accepted


@pytest.mark.slow
def test_unregistered_node_is_refused_and_a_killed_node_is_tolerated(certs, tmp_path):
    """One SuperLink (TLS, node auth): a SuperNode whose key was never registered exits with Flower's
    "Failed to activate SuperNode"; of the two registered ones, node 1 is killed after the first round, and
    the run completes within ``federation.max_failures=1`` (round 2 aggregates node 0 only) with status
    ``finished:completed``; then the submitted run's status says ``finished:failed`` for a run whose
    ``out`` escapes the run root, which ``fedlt.deploy`` turns into exit status 1."""
    d = Deployment(Certs(certs), tmp_path / "work", tmp_path / "runs")
    try:
        d.start_superlink()
        d.register([certs / "node-0", certs / "node-1"])
        intruder = d.start_node(2, 2)  # node-2.pub was never registered
        assert intruder.wait(timeout=300) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "work" / "node-2.log").read_text()
        d.procs.pop("node-2")
        for k in range(2):
            d.start_node(k, 2)

        run_id = d.submit(ROOT, {"config": "", "out": "killed",
                                 "overrides": " ".join(["name=killed", "federation.max_failures=1", *TINY])})
        metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 900

        def rounds_done() -> int:  # row 0 (the initial model) is written before round 1 starts
            text = metrics.read_text() if metrics.is_file() else ""
            return max((json.loads(line).get("round", 0) for line in text.splitlines() if line.strip()), default=0)

        while rounds_done() < 1:
            assert time.monotonic() < deadline, d.tail("superlink", 20)
            assert d.status(run_id)["status"] != "finished:failed"
            time.sleep(2)
        d.kill("node-1", signal.SIGTERM)  # after round 1; round 2's message to it fails
        row = d.follow(run_id, timeout=900, stream=False)
        assert row["status"] == "finished:completed", row
        summary = json.loads((tmp_path / "runs" / "killed" / "summary.json").read_text())
        assert summary["rounds"] == 2
        state = torch.load(tmp_path / "runs" / "killed" / "checkpoint.pt", weights_only=True)["state"]
        assert state["strategy"]["failures"] == 1  # node 1's round-2 message failed, and was tolerated

        bad = d.submit(ROOT, {"config": "", "out": "../escape", "overrides": " ".join(TINY)})
        row = d.follow(bad, timeout=600, stream=False)
        assert row["status"] == "finished:failed" and "outside the run root" in row["status-details"], row
        assert not (tmp_path / "escape").exists()
    finally:
        d.stop()


@pytest.mark.slow
@pytest.mark.heavy
def test_deployment_of_host_nodes(certs, tmp_path):
    """``python -m fedlt.deploy run federation.hosts=2`` with 4 partitions: 2 authenticated SuperNodes, each a
    host of 2 partitions training them fused; the run completes and aggregates all 4 clients every round."""
    res = subprocess.run([sys.executable, "-m", "fedlt.deploy", "run", "--certs", str(certs), "--out", str(tmp_path),
                          "--quiet", "--timeout", "900", "name=hosts", *TINY, "partition.num_clients=4",
                          "federation.hosts=2"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 SuperNodes (hosts, 4 partitions among them) registered and started" in res.stdout
    rows = [json.loads(line) for line in (tmp_path / "hosts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows if r.get("round", 0) > 0] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert json.loads((tmp_path / "hosts" / "summary.json").read_text())["rounds"] == 2
