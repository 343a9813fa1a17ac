"""Host nodes (``federation.hosts = H``): H Flower nodes, each holding a share of the partitions and training its
share of every round's cohort fused — the fused engine scaled out over GPUs or machines.

Without hosts (``federation.hosts = 0``, the default) a federation has one Flower node per partition. With
H ≥ 1 it has H nodes — under Flower's simulation engine H virtual SuperNodes (one Ray actor each, with
``federation.client_gpus`` of a GPU), in a deployment H ``flower-supernode`` processes started with
``--node-config "partition-id=h num-partitions=H"`` — and host h holds the contiguous block
:func:`hosted_partitions` (h, H, K) of the K partitions: ``numpy.array_split(range(K), H)[h]``.

The strategies do not change: they still address one node per partition and receive one reply per client.
On the server, :class:`HostedGrid` wraps the Grid the ServerApp is given and presents one *virtual* node per
partition. It asks each host once which partitions it holds (the query ``hosted-partitions``), then packs the
messages of one push for one host into ONE Flower message (:func:`pack`: each distinct record once, so the
global weights the round's messages share travel once) and unpacks the host's one reply into a reply per
virtual message, from that partition's virtual node; a whole host failing gives each of its messages that
error reply (the strategy's failure policy then counts each client).

On the node, the ClientApp (:func:`fedlt.federation.apps.make_client_app`) answers a packed message with
:func:`answer_hosted`: each part becomes the message the partition's own node would have received (with a
``Context`` whose ``node_config`` names the partition, and whose ``state`` persists on the host across
messages under the key prefix ``p<pid>/``), and :func:`fedlt.federation.fused.answer_cohort` answers them —
the train messages that fuse as one stacked model on the host's device (a DP clipping norm's clip applied
to each reply, as the ClientApp's mod would), the others (queries, injected failures, methods that override
``fit``) by the ClientApp one at a time, each error as that
partition's own error reply. Results equal the one-node-per-partition federation's within the fused
engine's float tolerance (tests/test_hosts.py).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterable
from uuid import uuid4

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlt.config import Config
from fedlt.device import resolve_device
from fedlt.errors import FedLTError
from fedlt.federation.strategy import client_error

PACKED = "fedlt-hosted"  # the ConfigRecord of a packed message or reply: which part holds which records
HOSTED_PARTITIONS = "hosted-partitions"  # the query a host answers with the partition ids it holds


def hosted_partitions(host: int, hosts: int, num_partitions: int) -> list[int]:
    """The partitions host ``host`` of ``hosts`` holds: the ``host``-th of ``hosts`` contiguous, near-equal
    blocks of 0..K-1 (``numpy.array_split``; the first K mod H blocks one larger)."""
    if not 0 <= host < hosts <= num_partitions:
        raise FedLTError(f"host {host} of {hosts} cannot hold a share of {num_partitions} partitions "
                         f"(need 0 <= host < federation.hosts <= partition.num_clients)")
    return [int(p) for p in np.array_split(np.arange(num_partitions), hosts)[host]]


# ------------------------------------------------------------------------------------------ packing

def pack(parts: list[RecordDict], fields: dict[str, list]) -> RecordDict:
    """One RecordDict holding every part: each distinct record once (by identity) under ``r<j>``, and under
    :data:`PACKED` the per-part layout (JSON: the part's key -> ``r<j>``) beside ``fields`` (lists, one
    entry per part)."""
    content, ref_of, layout = RecordDict(), {}, []
    for part in parts:
        refs = {}
        for key, record in part.items():
            if id(record) not in ref_of:
                ref_of[id(record)] = f"r{len(ref_of)}"
                content[ref_of[id(record)]] = record
            refs[key] = ref_of[id(record)]
        layout.append(json.dumps(refs))
    content[PACKED] = ConfigRecord({"layout": layout, **fields})
    return content


def unpack(content: RecordDict) -> list[RecordDict]:
    """The parts :func:`pack` packed into ``content``, in order."""
    layout = content.config_records[PACKED]["layout"]
    return [RecordDict({key: content[ref] for key, ref in json.loads(refs).items()}) for refs in layout]


def is_packed(msg: Message) -> bool:
    return not msg.has_error() and PACKED in msg.content


def is_host_message(msg: Message) -> bool:
    """A message only a host node answers: a packed one, or the query for the partitions it holds."""
    if is_packed(msg):
        return True
    config = msg.content.config_records.get("config") if not msg.has_error() else None
    return msg.metadata.message_type == MessageType.QUERY and config is not None \
        and config.get("action") == HOSTED_PARTITIONS


def pack_replies(replies: list[Message]) -> RecordDict:
    """A host's one reply content: each part's reply content, or its error as ``[code, reason]``."""
    errors = [json.dumps([r.error.code, r.error.reason]) if r.has_error() else "" for r in replies]
    return pack([RecordDict() if r.has_error() else r.content for r in replies], {"errors": errors})


def unpack_replies(reply: Message, parts: list[Message]) -> list[Message]:
    """The reply to each of ``parts`` (the virtual messages packed into the message ``reply`` answers)."""
    if reply.has_error():  # the host failed as a whole: every part fails with its error
        return [Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=m) for m in parts]
    contents = unpack(reply.content)
    errors = reply.content.config_records[PACKED]["errors"]
    if len(contents) != len(parts):
        raise RuntimeError(f"a host answered {len(contents)} of {len(parts)} packed messages")
    out = []
    for m, content, error in zip(parts, contents, errors):
        if error:
            code, reason = json.loads(error)
            out.append(Message(Error(code=int(code), reason=str(reason)), reply_to=m))
        else:
            out.append(Message(content, reply_to=m))
    return out


# ------------------------------------------------------------------------------------------ the server side

class HostedGrid(Grid):
    """The Grid the strategies see with host nodes: one virtual node per partition over the host nodes of
    ``grid`` (module docstring). Node ids are drawn like Flower's (random, not in partition order)."""

    def __init__(self, grid: Grid, hosts: int, num_partitions: int, timeout: float = 600.0) -> None:
        self.grid, self.hosts, self.num_partitions, self.timeout = grid, hosts, num_partitions, timeout
        self.host_of: dict[int, tuple[int, int]] | None = None  # virtual node -> (host node, partition id)
        self.pending: dict[str, list[Message]] = {}  # packed message id -> the virtual messages in it
        self.replies: dict[str, Message] = {}  # virtual message id -> its reply, until pulled

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """One virtual node per partition once all ``hosts`` host nodes are connected (none before)."""
        if self.host_of is None:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) < self.hosts:
                return []
            self.host_of = self._ask_hosts(nodes)
        return list(self.host_of)

    def _ask_hosts(self, nodes: list[int]) -> dict[int, tuple[int, int]]:
        if len(nodes) > self.hosts:
            raise FedLTError(f"{len(nodes)} nodes connected, federation.hosts={self.hosts}: start one node per host")
        msgs = [Message(RecordDict({"config": ConfigRecord({"action": HOSTED_PARTITIONS})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
        held: dict[int, int] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise client_error(reply) or RuntimeError(f"host node {node} failed to report its partitions:\n"
                                                          f"{reply.error.reason}")
            for pid in reply.content["metrics"]["partition-ids"]:
                if pid in held:
                    raise FedLTError(f"host nodes {held[pid]} and {node} both hold partition {pid}: give each host "
                                     f"its own partition-id 0..{self.hosts - 1} with num-partitions={self.hosts}")
                held[int(pid)] = node
        if sorted(held) != list(range(self.num_partitions)):
            raise FedLTError(f"the host nodes hold partitions {sorted(held)}, expected 0..{self.num_partitions - 1}")
        ids = random.Random(f"hosted {self.hosts}").sample(range(2**40, 2**63), self.num_partitions)
        if set(ids) & set(nodes):
            raise RuntimeError("a virtual node id equals a host node id")
        return {ids[pid]: (held[pid], pid) for pid in range(self.num_partitions)}

    def _pack(self, messages: Iterable[Message]) -> list[tuple[Message, list[Message]]]:
        """One message per (host, message type) holding the virtual ``messages`` for that host's partitions,
        each with the virtual messages it holds (given their ids here, as a SuperLink would)."""
        self.get_node_ids()
        groups: dict[tuple[int, str], list[Message]] = {}
        for msg in messages:
            if self.host_of is None or msg.metadata.dst_node_id not in self.host_of:
                raise ValueError(f"message to unknown node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            node = self.host_of[msg.metadata.dst_node_id][0]
            groups.setdefault((node, msg.metadata.message_type), []).append(msg)
        out = []
        for (node, message_type), parts in groups.items():
            pids = [self.host_of[m.metadata.dst_node_id][1] for m in parts]
            content = pack([m.content for m in parts], {"partition-ids": pids})
            ttl = min(m.metadata.ttl for m in parts)
            out.append((self.grid.create_message(content, message_type, node, parts[0].metadata.group_id, ttl), parts))
        return out

    def _unpack(self, replies: Iterable[Message], parts_of: dict[str, list[Message]]) -> list[Message]:
        out = []
        for reply in replies:
            parts = parts_of.pop(reply.metadata.reply_to_message_id, None)
            if parts is not None:
                out += unpack_replies(reply, parts)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batches = self._pack(messages)
        self.grid.push_messages([packed for packed, _ in batches])
        for packed, parts in batches:
            self.pending[packed.metadata.message_id] = parts
        return [m.metadata.message_id for _, parts in batches for m in parts]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if self.pending:
            for r in self._unpack(self.grid.pull_messages(list(self.pending)), self.pending):
                self.replies[r.metadata.reply_to_message_id] = r
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The wrapped Grid's send-and-receive of the packed messages, unpacked: a host that does not answer
        within ``timeout`` leaves its messages without replies, as a node that does not answer would."""
        batches = self._pack(messages)
        replies = self.grid.send_and_receive([packed for packed, _ in batches], timeout=timeout)
        return self._unpack(replies, {packed.metadata.message_id: parts for packed, parts in batches})


# ------------------------------------------------------------------------------------------ the node side

def answer_hosted(cfg: Config, app: ClientApp, msg: Message, context: Context) -> Message:
    """A host node's reply to ``msg``: the partitions it holds (the query :data:`HOSTED_PARTITIONS`), or the
    packed replies to a packed message (module docstring); ``app`` answers the parts that do not fuse."""
    from fedlt.federation.fused import answer_cohort

    h, hosts = int(context.node_config[PARTITION_ID_KEY]), int(context.node_config[NUM_PARTITIONS_KEY])
    if hosts != cfg.federation.hosts:
        raise FedLTError(f"this node is host {h} of {hosts} (its node config's num-partitions), and the run's "
                         f"config says federation.hosts={cfg.federation.hosts}")
    held = hosted_partitions(h, hosts, cfg.partition.num_clients)
    if not is_packed(msg):  # the query for the partitions held
        return Message(RecordDict({"metrics": MetricRecord({"partition-ids": held})}), reply_to=msg)
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    pids = [int(p) for p in msg.content.config_records[PACKED]["partition-ids"]]
    stray = sorted(set(pids) - set(held))
    if stray:
        raise FedLTError(f"host {h} holds partitions {held[0]}..{held[-1]}, not {stray}")
    items = []
    for pid, content in zip(pids, unpack(msg.content)):
        part = Message(content=content, metadata=copy.copy(msg.metadata))
        part.metadata.__dict__["_message_id"] = str(uuid4())
        state = RecordDict({k.split("/", 1)[1]: v for k, v in context.state.items() if k.startswith(f"p{pid}/")})
        node_config = {PARTITION_ID_KEY: pid, NUM_PARTITIONS_KEY: cfg.partition.num_clients}
        items.append((part, Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config,
                                    state=state, run_config=context.run_config)))
    replies = answer_cohort(cfg, app, resolve_device(cfg.device), items)
    for pid, (_, part_context) in zip(pids, items):  # each partition's state persists on the host
        for key in [k for k in context.state if k.startswith(f"p{pid}/")]:
            del context.state[key]
        for key, record in part_context.state.items():
            context.state[f"p{pid}/{key}"] = record
    return Message(pack_replies(replies), reply_to=msg)
