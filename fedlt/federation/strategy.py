"""The base of every fedlt server strategy: a Flower ``FedAvg`` with a seeded cohort, per-node messages,
a failure policy, deterministic aggregation order and a few hooks for long-tail methods.

Hooks a strategy plug-in may override (each optional):

- ``setup(grid, arrays)``: before round 1 (e.g. estimate the global class prior with a query round);
- ``run_round(server_round, arrays, config, grid)``: one whole round (default: configure_train, one
  send-and-receive, aggregate_train); a strategy with sub-rounds (GBME's expert phase) or extra query
  rounds (CReFF) overrides it;
- ``train_config(server_round, partition_id)``: extra config for one client's train message;
- ``client_records(server_round, partition_id)``: extra ArrayRecords for one client's messages (train and
  query): per-client state the server keeps for it, e.g. FedROD's personal head (the client reads them from
  ``config["records"]``, :func:`fedlt.federation.apps.message_config`);
- ``aggregate_checked(server_round, replies)``: the aggregation rule (Flower's FedAvg by default; a strategy
  with another rule, e.g. FedAvgM's server momentum, inherits it from Flower): the hook to override;
- ``aggregate_train(server_round, replies)``: Flower's own hook: records the partitions aggregated, then
  ``aggregate_checked``;
- ``eval_model(model)``: the model to evaluate, given the global model (e.g. with a re-trained classifier);
- ``transform_logits(logits)``: a post-hoc change to the global model's test logits;
- ``summary_extras()``: what the strategy adds to ``summary.json`` (estimated prior, groups …);
- ``state_dict()`` / ``load_state_dict(state)``: server-side state, saved with each checkpoint.

The round's own calls between hooks (``run_round`` -> ``configure_train`` -> ``messages`` ->
``train_config``; ``run_round`` -> ``aggregate_train`` -> ``aggregate_checked``) go through ``self.outer``: the strategy itself, or the
outermost wrapper around it (:mod:`fedlt.federation.compose`), so that a wrapper's override of one of these
hooks (e.g. DP's noise on every aggregation, GBME's sub-rounds included) applies inside its base.

Every hook receives replies the failure policy has been applied to (:meth:`FedLTStrategy.check_replies`: failed
clients dropped within ``federation.max_failures``, counted, the run stopped beyond it): the round loop gives
the strategy a Grid whose ``send_and_receive`` checks each batch of replies
(:class:`fedlt.federation.server.CheckedGrid`), so a plug-in that overrides ``run_round``, ``aggregate_train``
or ``aggregate_checked`` never sees a failed reply and cannot skip the policy.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlt.config import Config, federated_method
from fedlt.errors import ClientFailure, FedLTError
from fedlt.federation.records import array_record, array_to_numpy, keep_dtypes, numpy_to_array
from fedlt.options import StrategyOptions
from fedlt.streams import Stream, seeded_rng

CLIENT_ERROR = "fedlt client error: "
"""Marks the first line of a :class:`FedLTError` raised on a client (:func:`fedlt.federation.apps.client_errors`)."""


def weighted_mean_arrays(records: list[RecordDict], weighted_by_key: str | None) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords`` (``flwr/serverapp/strategy/strategy_utils.py``), the same arithmetic in
    the same order — Σ_k (w_k / Σ_j w_j) · a_k over the replies in order, every ArrayRecord of a reply, w_k its
    MetricRecord's ``weighted_by_key`` (None: w_k = 1, the plain mean) — with each array decoded and encoded
    through :func:`~fedlt.federation.records.array_to_numpy` / :func:`~fedlt.federation.records.numpy_to_array`
    (``np.load`` of each reply's ~200 arrays was most of a round's aggregation). Equal bytes (tested)."""
    weights = [1 if weighted_by_key is None else next(iter(r.metric_records.values()))[weighted_by_key]
               for r in records]
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for record, weight in zip(records, (w / total for w in weights), strict=True):
        for arrays in record.array_records.values():
            for key, value in arrays.items():
                if key not in out:
                    out[key] = array_to_numpy(value) * weight
                else:
                    out[key] += array_to_numpy(value) * weight
    return array_record({k: numpy_to_array(np.asarray(v)) for k, v in out.items()})


def client_error(msg: Message) -> FedLTError | None:
    """The one-line :class:`FedLTError` an error reply carries (marked with :data:`CLIENT_ERROR`), else None."""
    match = re.search(re.escape(CLIENT_ERROR) + r"([^\n]*)", msg.error.reason or "")
    return None if match is None else FedLTError(match.group(1).rstrip("'>").rstrip())


class CheckedReplies(list):
    """Replies :meth:`FedLTStrategy.check_replies` has checked: the failed ones dropped (and counted), the rest
    sorted by partition id. Checking them again returns them as they are, so that the replies a query receives
    from the round's checked grid (:class:`fedlt.federation.server.CheckedGrid`) are counted once."""


@dataclass
class FailedReply:
    """One client's error reply: its partition id (None if unknown), the error's first line, its traceback."""

    partition: int | None
    error: str
    traceback: str


@dataclass
class RoundRecord:
    """What one round's replies were: the partition ids aggregated (one list per aggregation: GBME's expert
    phase aggregates once per expert) and the failures, as metrics.jsonl records them; ``trained``, the partition
    ids of the train replies that passed the failure policy (one list per batch of replies), stands in for
    ``aggregated`` where a plug-in's ``aggregate_train`` does not call fedlt's, which records it."""

    number: int = 0
    aggregated: list[list[int]] = field(default_factory=list)
    trained: list[list[int]] = field(default_factory=list)
    failed: list[FailedReply] = field(default_factory=list)


_WRAPPED = re.compile(r"<class '([^']+)'>:<'(.*)'>", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BLOCK = re.compile(r"<<fedlt-client-error (\d+)\n(.*?)\n(.*?) fedlt-client-error>>", re.DOTALL)


def parse_error(reason: str, partition: int | None) -> FailedReply:
    """The client's error inside an error reply's ``reason``: the block a fedlt ClientApp writes
    (:func:`fedlt.federation.apps.client_error`) without what Flower and Ray wrap around it; otherwise (the
    node died, a mod failed) the reason's first non-empty line and the whole reason, for partition ``partition``
    (looked up from the replying node)."""
    found = _BLOCK.search(reason or "")
    if found:  # Ray may have put its actor header ("ray::ClientAppActor.run() (pid=…)") and colours in between
        lines = _ANSI.sub("", found.group(3)).rstrip().splitlines()
        return FailedReply(int(found.group(1)), found.group(2).strip(),
                           "\n".join(line for line in lines if "ray::" not in line))
    text = (reason or "no reason given").strip()
    wrapped = _WRAPPED.fullmatch(text)  # Flower's "<class 'T'>:<'message'>"
    if wrapped:
        text = f"{wrapped.group(1).rsplit('.', 1)[-1]}: {wrapped.group(2).strip()}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return FailedReply(partition, first, text)


def round_lr(cfg: Config, server_round: int) -> float:
    """The clients' lr in round t (1-based), from ``federation.lr_schedule`` over the rounds."""
    fed, lr = cfg.federation, cfg.train.lr
    if fed.lr_schedule == "step":
        return lr * fed.lr_gamma ** sum(server_round > m for m in fed.lr_milestones)
    if fed.lr_schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * (server_round - 1) / max(fed.rounds, 1)))
    return lr


def sample_cohort(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """Partition ids of round ``server_round``: max(1, round(fraction·K)) distinct clients, sorted, drawn from a generator seeded by (seed, round) so a resumed run draws the same cohorts."""
    size = max(1, int(round(fraction * num_clients)))
    rng = seeded_rng(seed, Stream.COHORT, server_round)
    return sorted(rng.choice(num_clients, size=size, replace=False).tolist())


def reply_metrics(msg: Message) -> MetricRecord:
    """The (one) MetricRecord of a client's reply."""
    return next(iter(msg.content.metric_records.values()))


def returned_pair(result: Any, strategy: FedLTStrategy, hook: str) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """``result``, what ``strategy``'s ``hook`` (``aggregate_checked``, ``aggregate_train``, ``run_round``)
    returned, when it is the pair (arrays, metrics) the round needs; else a one-line :class:`FedLTError` naming
    the strategy and the hook (an override without its ``return`` stopped the round loop with ``TypeError:
    cannot unpack non-iterable NoneType object``)."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return result[0], result[1]
    shown = repr(result) if len(repr(result)) <= 60 else f"a {type(result).__name__}"
    method = getattr(type(strategy), hook, None)
    where = getattr(method, "__qualname__", hook)
    raise FedLTError(f"strategy {strategy.cfg.strategy.name}: {where} returned {shown}, not the pair "
                     f"(arrays, metrics) of the round's aggregate: an override of {hook} must return it "
                     f"(e.g. return super().{hook}(...))")


class FedLTStrategy(FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017): w ← Σ_k (n_k / Σ_j n_j)·w_k over the round's cohort.

    Of Flower's ``FedAvg`` constructor only ``fraction_train`` (= ``federation.fraction``) and the record keys
    are used: fedlt draws its own cohorts (:func:`sample_cohort`) and never calls Flower's ``configure_*`` or
    its federated evaluation, so ``min_*_nodes`` and ``fraction_evaluate`` would have no effect and are not
    passed (the round loop waits for every partition's node instead, :func:`fedlt.federation.server.discover_nodes`).
    """

    client: str = "fedavg"  # the client method this strategy pairs with
    # the method is all in ``client``: the server aggregates as FedAvg and sends or keeps only what that client
    # reads (FedProx, FedLC, FedETF, FedROD), so a config pairing it with another client method would run FedAvg
    # under this strategy's name, and is refused (fedlt.config.check_parts)
    client_only: bool = False
    # options of ``client`` that this strategy's server sends to every client from its own option of the same
    # name (FedProx's μ, FedLC's τ), so a ``client.<key>`` set in the config would never be read: refused
    # (fedlt.config.check_parts)
    sends: tuple[str, ...] = ()
    Options = StrategyOptions  # a strategy with keys of its own subclasses this (``class Options(...)``)

    def __init__(self, cfg: Config, num_classes: int, **flower_kwargs: Any) -> None:
        super().__init__(fraction_train=cfg.federation.fraction, **flower_kwargs)
        self.cfg = cfg
        self.opts = cfg.strategy
        self.num_classes = num_classes
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id
        self.failures = 0
        self.failures_by_round: dict[int, int] = {}  # round (0: set-up queries) -> client failures
        self.round_record = RoundRecord()  # the current round's aggregated clients and failures
        self.max_failures = cfg.federation.max_failures
        self.last_cohort: list[int] = []
        self.fit_seconds = 0.0  # clients' own training time in the replies checked since the loop reset it
        self.train_images = 0  # images the clients trained on (their ``train-images``), idem
        self.global_arrays: ArrayRecord | None = None  # the latest global weights (set by the round loop)
        self.outer: FedLTStrategy = self  # whose hooks this strategy's round calls (a wrapper sets itself)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, as a one-line :class:`~fedlt.errors.FedLTError`, a config this strategy cannot run (a check
        across sections, e.g. on the model; :func:`fedlt.config.check_parts` calls it when the config is read)."""

    # ------------------------------------------------------------------ plumbing
    def bind(self, node_of: dict[int, int]) -> None:
        self.node_of = dict(node_of)

    @property
    def num_clients(self) -> int:
        return len(self.node_of)

    def cohort(self, server_round: int) -> list[int]:
        return sample_cohort(self.cfg.seed, server_round, self.num_clients, self.fraction_train)

    def messages(self, pids: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str,
                 server_round: int) -> list[Message]:
        """One message per client: the shared arrays and config plus its own ``train_config``."""
        out = []
        for pid in pids:
            cfg = ConfigRecord({**dict(config), "server-round": server_round, "partition-id": pid,
                                **self.outer.train_config(server_round, pid)})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg,
                                  **self.outer.client_records(server_round, pid)})
            out.append(Message(content=content, message_type=message_type, dst_node_id=self.node_of[pid]))
        return out

    def begin_round(self, server_round: int) -> None:
        """Start the records of round ``server_round`` (0: the set-up before round 1)."""
        self.round_record = RoundRecord(server_round)
        self.fit_seconds, self.train_images = 0.0, 0

    def check_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Drop error replies within the failure budget (``federation.max_failures`` over the run), else raise
        :class:`ClientFailure` naming the partition, with the client's traceback; record each failure in the
        round's record. Every reply an error: a one-line :class:`ClientFailure`. Sort the rest by partition id
        so that aggregation sums in the same order every run. Replies already checked (:class:`CheckedReplies`)
        are returned as they are: each failure counts once."""
        if isinstance(replies, CheckedReplies):
            return replies
        replies = list(replies)
        pid_of = {node: pid for pid, node in self.node_of.items()}
        record = self.round_record
        ok, failed = [], []
        for msg in replies:
            if msg.has_error():
                error = client_error(msg)
                if error is not None:  # bad data or a non-finite loss: the run stops with the client's line
                    raise error
                f = parse_error(msg.error.reason, pid_of.get(msg.metadata.src_node_id))
                self.failures += 1
                self.failures_by_round[record.number] = self.failures_by_round.get(record.number, 0) + 1
                record.failed.append(f)
                failed.append(f)
                if self.failures > self.max_failures:
                    raise ClientFailure(f"client of partition {f.partition} failed in round {record.number}: "
                                        f"{f.error} (failure {self.failures}, federation.max_failures="
                                        f"{self.max_failures})\nclient traceback:\n{f.traceback}")
                print(f"warning: client of partition {f.partition} failed in round {record.number}: {f.error} "
                      f"(failure {self.failures}/{self.max_failures} tolerated)", flush=True)
            else:
                ok.append(msg)
                self.fit_seconds += float(reply_metrics(msg).get("fit_seconds", 0.0))
                self.train_images += int(reply_metrics(msg).get("train-images", 0))
        if replies and not ok:
            raise ClientFailure(f"round {record.number}: every client failed (partitions "
                                f"{', '.join(str(f.partition) for f in failed)}; first error: {failed[0].error}), "
                                f"nothing to aggregate ({self.failures} failures so far, federation.max_failures="
                                f"{self.max_failures})")
        ok = sorted(ok, key=lambda m: reply_metrics(m)["partition-id"])
        trained = [int(reply_metrics(m)["partition-id"]) for m in ok if m.metadata.message_type == MessageType.TRAIN]
        if trained:
            record.trained.append(trained)
        return CheckedReplies(ok)

    def query(self, grid: Grid, pids: list[int], arrays: ArrayRecord, action: str, config: dict | None = None,
              timeout: float = 3600, server_round: int = 0) -> list[Message]:
        """Send a query ``action`` to clients and return their (checked, sorted) replies. A query outside the
        rounds (``server_round`` 0: the set-up's, e.g. GBME's local epoch on every client, or the final local
        evaluation) says so in a progress line before it is sent and one when it is answered."""
        cfg = ConfigRecord({"action": action, **(config or {})})
        msgs = self.outer.messages(pids, arrays, cfg, MessageType.QUERY, server_round)
        said, t0, label = server_round == 0, time.time(), f"[federated {federated_method(self.cfg)}]"
        if said:
            print(f"{label} query {action!r} to {len(pids)} client{'s' if len(pids) != 1 else ''} (outside the "
                  "rounds)", flush=True)
        replies = self.check_replies(grid.send_and_receive(msgs, timeout=timeout))
        if said:
            print(f"{label} query {action!r}: {len(replies)} repl"
                  f"{'ies' if len(replies) != 1 else 'y'} in {time.time() - t0:.1f}s", flush=True)
        return replies

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.last_cohort = self.cohort(server_round)
        return self.outer.messages(self.last_cohort, arrays, config, MessageType.TRAIN, server_round)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the partitions whose replies the round aggregates, then :meth:`aggregate_checked` them. The
        replies are already checked: the round's grid applied the failure policy
        (:class:`fedlt.federation.server.CheckedGrid`), whichever hook a plug-in overrides."""
        replies = list(replies)
        self.round_record.aggregated.append([int(reply_metrics(m)["partition-id"]) for m in replies])
        return returned_pair(self.outer.aggregate_checked(server_round, replies), self.outer, "aggregate_checked")

    def mean_weighted_by(self) -> str | None:
        """The reply metric that weights each client's arrays in the FedAvg mean: ``num-examples``
        (``weighted_by_key``); None for the plain mean over clients."""
        return self.weighted_by_key

    def aggregate_checked(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies already checked (:meth:`check_replies`: no failed reply among them): Flower's rule of
        this class's bases, each array back in its replies' dtype (an integer buffer rounded,
        :func:`~fedlt.federation.records.keep_dtypes`). The hook a strategy with its own rule overrides."""
        rule = getattr(super().aggregate_train, "__func__", None)
        if rule is FedAvg.aggregate_train:  # Flower's FedAvg rule, its arrays averaged by weighted_mean_arrays
            valid, _ = self._check_and_log_replies(replies, is_train=True)  # Flower's own check (flwr 1.42, pinned)
            arrays, metrics = None, None
            if valid:
                contents = [m.content for m in valid]
                arrays = weighted_mean_arrays(contents, self.mean_weighted_by())
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and replies:
            keep_dtypes(arrays, replies[0].content[self.arrayrecord_key])
        return arrays, metrics

    def summary(self) -> None:  # Flower's log summary; fedlt prints its own progress
        pass

    # ------------------------------------------------------------------ fedlt hooks
    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        return arrays

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One round: the new global arrays and the aggregated train metrics (``grid``, the round loop's
        :class:`~fedlt.federation.server.CheckedGrid`, checks the replies)."""
        replies = grid.send_and_receive(self.outer.configure_train(server_round, arrays, config, grid))
        return returned_pair(self.outer.aggregate_train(server_round, replies), self.outer, "aggregate_train")

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def train_config(self, server_round: int, partition_id: int) -> dict:
        return {}

    def client_records(self, server_round: int, partition_id: int) -> dict[str, ArrayRecord]:
        return {}

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def summary_extras(self) -> dict:
        return {}

    def failure_summary(self) -> dict:
        """summary.json's ``failures``: the total, per round 1..T, and in the set-up queries before round 1."""
        by_round = self.failures_by_round
        return {"total": self.failures, "per_round": [by_round.get(t, 0) for t in range(1, self.cfg.federation.rounds + 1)],
                "setup": by_round.get(0, 0)}

    def state_dict(self) -> dict:
        return {"failures": self.failures, "failures_by_round": dict(self.failures_by_round)}

    def load_state_dict(self, state: dict) -> None:
        self.failures = state.get("failures", 0)
        self.failures_by_round = {int(k): int(v) for k, v in state.get("failures_by_round", {}).items()}
