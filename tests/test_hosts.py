"""Host nodes (``federation.hosts``, fedlt/federation/hosts.py): each holds a share of the partitions and trains its
share of a round fused; the strategies still see one node and one reply per partition."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.federation import fused
from fedlt.federation.apps import injected_failure, make_client_app
from fedlt.federation.fused import run_fused
from fedlt.federation.hosts import PACKED, hosted_partitions, pack, unpack
from fedlt.federation.inprocess import InProcessGrid, run_inprocess, run_on_grid
from fedlt.federation.strategy import sample_cohort

SMALL = ["mode=federated", "partition.num_clients=4", "train.batch_size=32", "model.name=small_cnn",
         "data.imbalance_factor=100", "eval.batch_size=4096"]


def test_hosts_hold_contiguous_near_equal_blocks_of_every_partition():
    assert [hosted_partitions(h, 3, 10) for h in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [hosted_partitions(h, 4, 4) for h in range(4)] == [[0], [1], [2], [3]]
    assert hosted_partitions(0, 1, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(FedLTError, match="cannot hold a share"):
        hosted_partitions(2, 2, 5)
    with pytest.raises(FedLTError, match="cannot hold a share"):
        hosted_partitions(0, 6, 5)


def test_hosts_key_is_checked_against_the_clients_and_the_engine():
    assert load_config(None, ["federation.hosts=2"]).federation.hosts == 2
    with pytest.raises(FedLTError, match=r"'federation.hosts' must be <= partition.num_clients=10 .*got 11"):
        load_config(None, ["federation.hosts=11"])
    with pytest.raises(FedLTError, match="'federation.hosts' must be >= 0"):
        load_config(None, ["federation.hosts=-1"])
    with pytest.raises(FedLTError, match="federation.engine=fused is already one host"):
        load_config(None, ["federation.hosts=2", "federation.engine=fused"])


def test_a_packed_message_holds_a_shared_record_once_and_unpacks_to_each_part():
    shared = ArrayRecord({"w": torch.arange(6.0).reshape(2, 3)})
    parts = [RecordDict({"arrays": shared, "config": ConfigRecord({"partition-id": p, "lr": 0.1})}) for p in (3, 5, 6)]
    parts.append(RecordDict({"config": ConfigRecord({"action": "x"})}))  # a part without arrays
    content = pack(parts, {"partition-ids": [3, 5, 6, 7]})
    assert len(content.array_records) == 1  # the weights the parts share travel once
    assert list(content.config_records[PACKED]["partition-ids"]) == [3, 5, 6, 7]
    out = unpack(content)
    assert [sorted(o) for o in out] == [["arrays", "config"]] * 3 + [["config"]]
    for part, o in zip(parts, out):
        assert dict(o["config"]) == dict(part["config"])
        if "arrays" in part:
            assert torch.equal(o["arrays"].to_torch_state_dict()["w"], shared.to_torch_state_dict()["w"])


@pytest.fixture
def small_test_set(monkeypatch):
    """The global evaluation on the first 2,000 test images (these tests compare engines, not accuracy)."""
    from fedlt.experiment import Experiment

    tensor_data = Experiment.tensor_data

    def first_2000(self, split="train", indices=None, device="cpu"):
        return tensor_data(self, split, np.arange(2000) if split == "test" and indices is None else indices, device)

    monkeypatch.setattr(Experiment, "tensor_data", first_2000)


def checkpoint_model(path):
    return torch.load(path / "checkpoint.pt", weights_only=False)["state"]["model"]


def rows_of(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if json.loads(x)["round"] > 0]


@needs_fashion
@pytest.mark.parametrize("strategy", [[], ["strategy.name=dp_client_fixed", "strategy.clipping_norm=0.01",
                                           "strategy.noise_multiplier=0"]], ids=["fedavg", "dp_client_fixed"])
def test_two_hosts_train_like_one_node_per_client(strategy, tmp_path, monkeypatch, small_test_set):
    """4 clients on 2 hosts, every client every round: each host trains its two clients as one fused group, and
    the run gives the weights (BatchNorm buffers included) and records of one node per client; with DP
    client-side clipping (C = 0.01 binds here), each fused update clipped as the ClientApp's mod clips it."""
    fused_groups = []
    original = fused.fused_replies
    monkeypatch.setattr(fused, "fused_replies", lambda cfg, device, method, items: fused_groups.append(
        sorted(int(c.node_config["partition-id"]) for _, c in items)) or original(cfg, device, method, items))
    args = SMALL + strategy + ["model.name=resnet8", "federation.rounds=1", "train.local_steps=3", "eval.every=10"]
    run_inprocess(load_config(None, args), str(tmp_path / "nodes"))
    assert fused_groups == []
    run_inprocess(load_config(None, args + ["federation.hosts=2"]), str(tmp_path / "hosts"))
    assert fused_groups == [[0, 1], [2, 3]]
    a, b = checkpoint_model(tmp_path / "nodes"), checkpoint_model(tmp_path / "hosts")
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    for k in a:  # the fused engine's float tolerance (a vmapped convolution rounds differently)
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4), k
    ra, rb = rows_of(tmp_path / "nodes"), rows_of(tmp_path / "hosts")
    assert [r["clients"] for r in ra] == [r["clients"] for r in rb] == [[0, 1, 2, 3]]
    assert [r["train_images"] for r in ra] == [r["train_images"] for r in rb] == [4 * 3 * 32]
    assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-4)


@needs_fashion
@pytest.mark.parametrize("engine", ["hosts", "fused"])
def test_injected_failures_are_the_same_with_hosts_and_fused(engine, tmp_path, small_test_set):
    """An injected failure fails its client with hosts and in the fused engine exactly as with one node per
    client (the fused trainer leaves that client to the ClientApp, which raises it); the others still fuse."""
    args = SMALL + ["federation.rounds=3", "federation.fraction=0.75", "train.local_steps=3", "eval.every=3",
                    "federation.failure_rate=0.4", "federation.max_failures=100"]
    cfg = load_config(None, args + (["federation.hosts=2"] if engine == "hosts" else []))
    expected = [[p for p in sample_cohort(0, t, 4, 0.75) if injected_failure(cfg, t, p)] for t in (1, 2, 3)]
    assert 0 < sum(map(len, expected)) < 9
    summary = (run_inprocess if engine == "hosts" else run_fused)(cfg, str(tmp_path / "run"))
    rows = rows_of(tmp_path / "run")
    for t, (row, failed) in enumerate(zip(rows, expected), 1):
        assert [f["partition"] for f in row["failed"]] == failed
        assert row["clients"] == [p for p in sample_cohort(0, t, 4, 0.75) if p not in failed]
        assert all(f["error"].endswith(f"injected failure of partition {f['partition']} in round {t} "
                                       f"(federation.failure_rate=0.4)") for f in row["failed"])
    assert summary["failures"]["per_round"] == list(map(len, expected))


@needs_fashion
def test_a_federation_whose_nodes_are_not_its_hosts_is_refused(tmp_path):
    """More nodes than hosts, fewer (after the discovery time-out), and hosts started for another number of hosts:
    each a one-line error before any round."""
    cfg = load_config(None, SMALL + ["federation.rounds=1", "federation.hosts=2", "federation.discovery_timeout=0.5"])
    with pytest.raises(FedLTError, match="3 nodes connected, federation.hosts=2: start one node per host"):
        run_on_grid(cfg, str(tmp_path / "three"), InProcessGrid(make_client_app(cfg), 3), False, "")
    with pytest.raises(FedLTError, match="only 1 of 2 host nodes connected within 1 s"):
        run_on_grid(cfg, str(tmp_path / "one"), InProcessGrid(make_client_app(cfg), 1), False, "")
    grid = InProcessGrid(make_client_app(cfg), 2)
    for context in grid.contexts.values():  # started as hosts of a 3-host federation
        context.node_config["num-partitions"] = 3
    with pytest.raises(FedLTError, match=r"^host [01]: this node is host [01] of 3 .* says federation.hosts=2$"):
        run_on_grid(cfg, str(tmp_path / "other"), grid, False, "")


@needs_fashion
@pytest.mark.slow
@pytest.mark.heavy
def test_two_hosts_under_flowers_simulation_engine_match_the_in_process_hosts(tmp_path):
    """Flower's simulation engine (Ray: 2 virtual SuperNodes, each a host of 2 clients in its own actor) gives
    the in-process hosts' result: the packed messages cross Ray's process boundary unchanged."""
    from fedlt.federation.runner import run_federated

    cfg = load_config(None, SMALL + ["federation.rounds=2", "train.local_steps=3", "eval.every=2",
                                     "federation.hosts=2", "federation.fraction=0.75"])
    a = run_inprocess(cfg, str(tmp_path / "inprocess"))
    b = run_federated(cfg, str(tmp_path / "flower"))
    assert a["accuracy"] == b["accuracy"]
    sa, sb = checkpoint_model(tmp_path / "inprocess"), checkpoint_model(tmp_path / "flower")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    clients = [[r["clients"] for r in rows_of(tmp_path / e)] for e in ("inprocess", "flower")]
    assert clients[0] == clients[1]


@pytest.fixture
def server_identity():
    """The ServerApp's task identity, which Flower's Message() reads (run_on_grid sets it around a run)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_push_and_pull_answer_each_virtual_node_from_its_host(server_identity):
    """Flower's push/pull form of the HostedGrid (strategies use send_and_receive): 5 partitions on 2 hosts; each
    virtual node's query comes back from that virtual node with its own partition id, and a reply is pulled
    once."""
    from flwr.app import Message, MessageType

    from fedlt.federation.hosts import HostedGrid

    cfg = load_config(None, ["mode=federated", "partition.num_clients=5", "federation.hosts=2"])
    grid = HostedGrid(InProcessGrid(make_client_app(cfg), 2), 2, 5)
    nodes = list(grid.get_node_ids())
    assert len(nodes) == 5 and not set(nodes) & set(grid.grid.get_node_ids())
    pid_of = {node: pid for node, (_, pid) in grid.host_of.items()}
    assert sorted({host for host, _ in grid.host_of.values()}) == sorted(grid.grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"action": "partition-id"})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    ids = list(grid.push_messages(msgs))
    assert len(ids) == 5 and len(grid.pending) == 2  # one packed message per host
    replies = list(grid.pull_messages(ids))
    assert {r.metadata.reply_to_message_id for r in replies} == set(ids)
    assert all(int(r.content["metrics"]["partition-id"]) == pid_of[r.metadata.src_node_id] for r in replies)
    assert list(grid.pull_messages(ids)) == []


@needs_fashion
def test_a_failing_host_fails_each_of_its_clients_within_the_failure_budget(tmp_path, monkeypatch, small_test_set):
    """Host 1 (partitions 2, 3) raises while training: each of its two clients gets that error reply, counted
    against federation.max_failures, and the round aggregates host 0's clients."""
    original = fused.answer_cohort

    def host_1_breaks(cfg, app, device, items):
        train = items[0][0].metadata.message_type == "train"
        if train and any(int(c.node_config["partition-id"]) >= 2 for _, c in items):
            raise RuntimeError("GPU fell off the bus")
        return original(cfg, app, device, items)

    monkeypatch.setattr(fused, "answer_cohort", host_1_breaks)
    cfg = load_config(None, SMALL + ["federation.rounds=1", "train.local_steps=2", "federation.hosts=2",
                                     "federation.max_failures=2"])
    summary = run_inprocess(cfg, str(tmp_path / "run"))
    (row,) = rows_of(tmp_path / "run")
    assert row["clients"] == [0, 1]
    assert [f["partition"] for f in row["failed"]] == [2, 3]
    assert all("GPU fell off the bus" in f["error"] for f in row["failed"])
    assert summary["failures"]["total"] == 2
