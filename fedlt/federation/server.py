"""The federated rounds: discover nodes, set up the strategy, then one round per step of the shared run
skeleton (:mod:`fedlt.run_loop`: evaluate, record, checkpoint, resume).

A round calls the strategy's Flower hooks (``configure_train`` / ``aggregate_train``) itself rather than
``Strategy.start`` so that a run can resume from its checkpoint at any round and write its own records; a
round is exactly what ``Strategy.start`` does, minus federated evaluation.

The strategy's hooks are given a :class:`CheckedGrid`: every batch of replies has been through the strategy's
failure policy, and every client's trained weights have been checked against the model's keys and shapes, before
any hook (a plug-in's override of ``run_round``, ``aggregate_train`` or ``aggregate_checked``) sees them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlt.config import Config, federated_method
from fedlt.device import resolve_device
from fedlt.errors import FedLTError
from fedlt.evaluation import evaluate_model
from fedlt.experiment import Experiment, experiment_for, model_for
from fedlt.federation.local_eval import LOCAL_EVAL, local_metrics, local_tests
from fedlt.federation.records import load_into, to_arrays
from fedlt.federation.strategy import (
    CheckedReplies,
    FedLTStrategy,
    RoundRecord,
    reply_metrics,
    returned_pair,
    round_lr,
)
from fedlt.registry import STRATEGIES
from fedlt.run_loop import run_steps
from fedlt.rundir import RunDir

REPLY_BOOKKEEPING = ("train_loss", "num-examples", "partition-id", "steps", "train-images", "fit_seconds")


def client_metrics(train_metrics: Any) -> dict[str, float]:
    """The round's train metrics beyond the loss and the replies' bookkeeping, as the strategy aggregated them
    (by default the mean over the clients weighted by their examples): a client method's
    :meth:`~fedlt.client_method.ClientMethod.round_metrics`, GBME's per-expert losses. Scalars only (a list, such
    as Fed-GraB's balancer state, stays with the strategy), each as ``clients/<key>`` in the round's row of
    metrics.jsonl so that no name of the client method's can shadow the test metrics."""
    return {f"clients/{key}": float(value) for key, value in dict(train_metrics or {}).items()
            if key not in REPLY_BOOKKEEPING and isinstance(value, (int, float)) and not isinstance(value, bool)}


def discover_nodes(grid: Grid, num_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every node for its ``partition-id``; return partition id -> node id. Waits up to ``timeout`` seconds
    (``federation.discovery_timeout``) for the nodes to connect and answer: under load Ray starts its actors
    slowly, which is said as a time-out, apart from a misconfiguration (a partition missing or doubled)."""
    t0 = time.time()
    raise_it = f"federation.discovery_timeout={timeout:g}; raise it on a busy machine"
    while len(list(grid.get_node_ids())) < num_clients:
        if time.time() - t0 > timeout:
            hosts = getattr(grid, "hosts", 0)  # a HostedGrid: its nodes appear once every host has connected
            if hosts:
                raise FedLTError(f"only {len(list(grid.grid.get_node_ids()))} of {hosts} host nodes connected "
                                 f"within {time.time() - t0:.0f} s ({raise_it}; a deployment starts one node per "
                                 f"host, federation.hosts)")
            raise FedLTError(f"only {len(list(grid.get_node_ids()))} of {num_clients} client nodes connected within "
                             f"{time.time() - t0:.0f} s ({raise_it}; a deployment starts one node per partition)")
        time.sleep(0.2)
    node_ids = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"action": "partition-id"})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in node_ids]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=max(1.0, timeout - (time.time() - t0))):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition:\n{reply.error.reason}")
        pid = int(reply.content["metrics"]["partition-id"])
        if pid in node_of:
            raise FedLTError(f"nodes {node_of[pid]} and {reply.metadata.src_node_id} both report partition {pid}: "
                             f"start one node per partition id 0..{num_clients - 1}")
        node_of[pid] = reply.metadata.src_node_id
    if len(node_of) < len(node_ids):
        raise FedLTError(f"{len(node_ids) - len(node_of)} of {len(node_ids)} client nodes did not report their "
                         f"partition id within {time.time() - t0:.0f} s ({raise_it})")
    if sorted(node_of) != list(range(num_clients)):
        raise FedLTError(f"nodes report partitions {sorted(node_of)}, expected 0..{num_clients - 1}: "
                         f"start one node per partition")
    return node_of


Shapes = dict[str, tuple[int, ...]]


def shapes_of(model: torch.nn.Module) -> Shapes:
    """The shape of each entry of ``model``'s state dict: what the global weights must hold to load into it."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def misfit(arrays: ArrayRecord, shapes: Shapes) -> str | None:
    """How ``arrays`` (a client's trained weights, an aggregate) fail to fit the model of ``shapes``: the first
    key of the model they lack, or hold in another shape; None when every key is there in its shape. Keys the
    model does not have are not looked at here (a strategy may take them off a reply before aggregating)."""
    for key, shape in shapes.items():
        if key not in arrays:
            return f"lack the global model's key {key!r} (shape {list(shape)})"
        if tuple(arrays[key].shape) != shape:
            return f"hold key {key!r} in shape {list(arrays[key].shape)}, the global model's is {list(shape)}"
    return None


def check_weights(replies: list[Message], shapes: Shapes, client: str, server_round: int) -> None:
    """Stop the run with a one-line :class:`FedLTError` (as a client's non-finite loss stops it) at the first
    train reply whose weights do not fit the model (:func:`misfit`), naming its partition and client method:
    aggregated, they made a traceback in ``load_state_dict`` that named neither (or, where another client's
    reply held the key, a silently wrong average)."""
    for msg in replies:
        if msg.metadata.message_type != MessageType.TRAIN:
            continue
        problem = misfit(msg.content["arrays"], shapes) if "arrays" in msg.content else "hold no weights"
        if problem is not None:
            pid = reply_metrics(msg).get("partition-id", "?")
            raise FedLTError(f"partition {pid}, round {server_round}: the weights client method {client} sent "
                             f"{problem}")


class CheckedGrid:
    """The Grid a run's strategy is given: ``grid`` (the engine's), with the replies of each
    ``send_and_receive`` passed through the strategy's failure policy
    (:meth:`~fedlt.federation.strategy.FedLTStrategy.check_replies`: failed clients dropped and counted within
    ``federation.max_failures``, the run stopped beyond it) and their weights checked (:func:`check_weights`).
    Checked here rather than in one hook, a plug-in that overrides any of ``run_round``, ``aggregate_train``
    or ``aggregate_checked`` gets checked replies, and cannot aggregate a failed client's (empty) reply."""

    def __init__(self, grid: Grid, strategy: FedLTStrategy, shapes: Shapes, client: str) -> None:
        self.grid, self.strategy, self.shapes, self.client = grid, strategy, shapes, client

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> CheckedReplies:
        replies = self.strategy.check_replies(self.grid.send_and_receive(messages, timeout=timeout))
        check_weights(replies, self.shapes, self.client, self.strategy.round_record.number)
        return replies

    def __getattr__(self, name: str) -> Any:  # the rest of the Grid (get_node_ids, push_messages …) unchanged
        return getattr(self.grid, name)


class FederatedSteps:
    """The rounds of a federated run (:class:`fedlt.run_loop.Steps`): the strategy's round, then the global model."""

    unit = "round"

    def __init__(self, grid: Grid, cfg: Config, exp: Experiment, device: torch.device) -> None:
        self.cfg, self.exp = cfg, exp
        self.label = f"federated {federated_method(cfg)}"
        self.total, self.checkpoint_every = cfg.federation.rounds, cfg.federation.checkpoint_every
        self.model = model_for(cfg, exp)
        self.shapes = shapes_of(self.model)
        self.strategy: FedLTStrategy = STRATEGIES.get(cfg.strategy.name)(cfg, exp.num_classes)
        self.strategy.bind(discover_nodes(grid, cfg.partition.num_clients, cfg.federation.discovery_timeout))
        self.grid = CheckedGrid(grid, self.strategy, self.shapes, str(cfg.client.name))
        self.test = exp.tensor_data("test", device=device)
        self.round = 0  # the latest round trained in this process (resumed: set by load_state_dict)

    def start(self) -> None:
        self.strategy.begin_round(0)
        self.strategy.global_arrays = self.strategy.setup(self.grid, to_arrays(self.model.state_dict()))

    def step(self, server_round: int) -> dict:
        t0 = time.time()
        self.round = server_round
        self.strategy.begin_round(server_round)
        config = ConfigRecord({"lr": round_lr(self.cfg, server_round)})
        arrays, train_metrics = returned_pair(
            self.strategy.run_round(server_round, self.strategy.global_arrays, config, self.grid), self.strategy,
            "run_round")
        if arrays is None:
            raise RuntimeError(f"round {server_round}: no client returned weights")
        self.check_aggregate(arrays, server_round)
        self.strategy.global_arrays = arrays
        load_into(self.model, arrays)
        record = self.strategy.round_record
        return {"train_loss": (train_metrics or {}).get("train_loss"), "clients": self.clients(record),
                "failed": [{"partition": f.partition, "error": f.error} for f in record.failed],
                "train_seconds": time.time() - t0, "client_fit_seconds": self.strategy.fit_seconds,
                "train_images": self.strategy.train_images, **client_metrics(train_metrics)}

    def check_aggregate(self, arrays: ArrayRecord, server_round: int) -> None:
        """A one-line :class:`FedLTError` naming the strategy where the round's aggregate would not load into
        the model (a key missing, another shape, or a key the model lacks): the clients' weights fitted
        (:func:`check_weights`), so the aggregation changed them."""
        problem = misfit(arrays, self.shapes)
        extra = [k for k in arrays if k not in self.shapes]
        if problem is None and extra:
            problem = f"hold key {extra[0]!r}, which the global model does not have"
        if problem is not None:
            raise FedLTError(f"round {server_round}: the weights strategy {self.cfg.strategy.name} aggregated "
                             f"{problem}")

    def clients(self, record: RoundRecord) -> list[int] | list[list[int]]:
        """The partition ids whose updates the round aggregated: one list, or one per aggregation where the
        round aggregated several times (GBME's experts). A plug-in whose ``aggregate_train`` does not record them:
        the clients whose train replies passed the failure policy; failing those, the round's cohort(s)."""
        lists = record.aggregated or record.trained
        if len(lists) == 1:
            return lists[0]
        return lists or self.strategy.last_cohort

    def evaluate(self, final: bool) -> dict:
        model = self.strategy.eval_model(self.model)
        metrics = evaluate_model(model, self.test, self.exp.train_counts, self.cfg.eval.batch_size,
                                 self.strategy.transform_logits, with_bins=final)
        local = self.cfg.eval.local
        if local == "every" or (local == "final" and final):
            metrics.update(self.evaluate_local(model))
        return metrics

    def evaluate_local(self, model: torch.nn.Module) -> dict:
        """Every client's personalised model on its local test set (the query ``local-eval``,
        :mod:`fedlt.federation.local_eval`), from the model the global evaluation evaluates (the strategy's
        ``eval_model``, e.g. CCVR's calibrated classifier, where it has the global model's keys; its post-hoc
        ``transform_logits`` is a global-test-set change and is not applied). A failed client within
        ``federation.max_failures`` is left out (``local_clients`` says how many answered)."""
        state = model.state_dict()
        arrays = to_arrays(state) if state.keys() == self.model.state_dict().keys() else self.strategy.global_arrays
        t = max(self.round, 1)  # the round just trained (the initial model: round 1's lr)
        self.strategy.begin_round(self.round)
        replies = self.strategy.query(self.grid, list(range(self.strategy.num_clients)), arrays, LOCAL_EVAL,
                                      {"lr": round_lr(self.cfg, t)}, server_round=t)
        k, c = self.strategy.num_clients, self.exp.num_classes
        correct, counts = np.zeros((k, c), np.int64), np.zeros((k, c), np.int64)
        for msg in replies:
            m = reply_metrics(msg)
            pid = int(m["partition-id"])
            correct[pid], counts[pid] = m["local-correct"], m["local-total"]
        return local_metrics(correct, counts, self.exp.train_counts)

    def finish(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "strategy": self.strategy.state_dict(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.strategy.global_arrays = to_arrays(state["model"])
        self.round = int(state.get("round", 0))
        load_into(self.model, self.strategy.global_arrays)

    def summary(self) -> dict:
        return {"mode": "federated", "method": federated_method(self.cfg), "client": self.cfg.client.name,
                "rounds": self.total, "train_class_counts": self.exp.train_counts.tolist(),
                "failures": self.strategy.failure_summary(),
                **self.strategy.summary_extras()}


def run_rounds(grid: Grid, cfg: Config, run: RunDir) -> dict:
    """Run (or resume) the federated part of ``cfg`` into ``run``; return the summary."""
    with run.lock():  # before the data and the nodes: a second run on this directory fails at once
        run.check_config(cfg)
        exp = experiment_for(cfg)
        device = resolve_device(cfg.device)
        local = local_tests(cfg) if cfg.eval.local != "off" else None
        partition = (exp.partition_counts(), exp.train_counts, exp.test.class_counts, cfg.partition.method, local)
        return run_steps(cfg, run, FederatedSteps(grid, cfg, exp, device), partition, device)
