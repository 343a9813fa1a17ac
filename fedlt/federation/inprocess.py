"""Run a federated config in this process: a Flower ``Grid`` that hands each message straight to the ClientApp.

The same ServerApp (:func:`fedlt.federation.apps.make_server_app`, hence the same round loop
:func:`fedlt.federation.server.run_rounds`) and the same ClientApp (:func:`fedlt.federation.apps.make_client_app`,
with its mods) run as under Flower's simulation engine (:mod:`fedlt.federation.runner`), without Ray: no actor
pool, no worker processes, no start-up cost. A test and benchmark engine; results are bit-identical to the
simulation engine's (tested in tests/test_federation.py).

What it keeps from Flower's simulation engine (``flwr/server/superlink/fleet/vce/vce_api.py`` and
``flwr/simulation/ray_transport/ray_actor.py``):

- one virtual node per partition, with ``node_config = {"partition-id": i, "num-partitions": K}`` and a
  ``Context`` that persists across the node's messages; node ids are not the partition ids (nor in their order);
- each node receives a copy of the message and the server a copy of the reply, as if serialised between processes;
- a ClientApp exception becomes an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, the reason names a
  ``ClientAppException`` and carries the client's traceback), which the strategy's failure policy handles;
- a client cannot disturb the server's process state: the torch thread count and the global random generators
  (torch, numpy, ``random``) are restored after every client call, as a separate worker process would leave them.

Messages are processed one after another in the order pushed; ``send_and_receive`` therefore never times out.
"""

from __future__ import annotations

import copy
import random
import traceback
from collections.abc import Iterable
from uuid import uuid4

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlt.config import Config
from fedlt.federation.apps import make_client_app, make_server_app
from fedlt.federation.runner import num_nodes, quiet_output, summary_of

RUN_ID = 1
TASK_ID = 1


class _ServerProcessState:
    """Saves the server's torch thread count and global random states; restores them after a client call."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        self.torch_rng = torch.get_rng_state()
        self.numpy_rng = np.random.get_state()
        self.python_rng = random.getstate()

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
        torch.set_rng_state(self.torch_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)


def call_client_app(app: ClientApp, msg: Message, context: Context) -> Message:
    """``app``'s reply to ``msg`` as a separate worker would give it: an exception becomes an error reply
    (``CLIENT_APP_RAISED_EXCEPTION``, Flower's simulation worker's form) and the caller's process state
    (torch threads, global random generators) is left as it was."""
    with _ServerProcessState():
        try:
            return app(msg, context)
        except Exception as ex:  # as Flower's simulation worker: the exception becomes an error reply
            exc = ClientAppException(f"{ex}\n{traceback.format_exc()}")
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ``num_nodes`` in-process calls of ``client_app``."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = RUN_ID) -> None:
        self._run = Run.create_empty(run_id)
        self.client_app = client_app
        # distinct 63-bit node ids that do not sort in partition order (as Flower's random ids)
        ids = random.Random(0).sample(range(2**40, 2**63), num_nodes)
        self.contexts = {node: Context(run_id=run_id, node_id=node,
                                       node_config={PARTITION_ID_KEY: pid, NUM_PARTITIONS_KEY: num_nodes},
                                       state=RecordDict(), run_config={})
                         for pid, node in enumerate(ids)}
        self.replies: dict[str, Message] = {}
        self.fresh: set[int] = set()  # id()s of this push's replies that no node code holds: kept without a copy

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Answer the messages now (:meth:`answer`); keep each reply for :meth:`pull_messages`."""
        msgs = [self.accept(msg) for msg in messages]
        self.fresh.clear()  # answer() names this push's fresh replies (none left from a push that raised)
        for msg, reply in zip(msgs, self.answer(msgs)):
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self.replies[msg.metadata.message_id] = reply if id(reply) in self.fresh else copy.deepcopy(reply)
        return [msg.metadata.message_id for msg in msgs]

    def answer(self, msgs: list[Message]) -> list[Message]:
        """The replies to one push's (accepted) messages, in order: the ClientApp on each, one at a time."""
        return [self._call_client(msg) for msg in msgs]

    def accept(self, msg: Message) -> Message:
        """Give ``msg`` its id, check it as a SuperLink would (not a reply, alive, to a known node) and return the
        copy a node receives."""
        return copy.deepcopy(self.check(msg))

    def check(self, msg: Message) -> Message:
        """Give ``msg`` its id and check it as a SuperLink would (not a reply, alive, to a known node)."""
        msg.metadata.__dict__["_message_id"] = str(uuid4())
        m = msg.metadata
        if m.reply_to_message_id or m.ttl <= 0 or m.delivered_at:
            raise ValueError(f"Invalid message: {msg}")
        if m.dst_node_id not in self.contexts:
            raise ValueError(f"message to unknown node {m.dst_node_id}")
        return msg

    def _call_client(self, msg: Message) -> Message:
        return call_client_app(self.client_app, msg, self.contexts[msg.metadata.dst_node_id])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(cfg: Config, run_path: str, verbose: bool = False) -> dict:
    """Run ``cfg`` as :func:`fedlt.federation.runner.run_federated` does, in this process; return the summary.
    A failing client or server re-raises here; Flower's log shows below WARNING only when ``verbose``."""
    grid = InProcessGrid(make_client_app(cfg), num_nodes(cfg))
    return run_on_grid(cfg, run_path, grid, verbose, "the in-process run ended without a result")


def run_on_grid(cfg: Config, run_path: str, grid: Grid, verbose: bool, missing: str) -> dict:
    """The ServerApp of ``cfg`` on ``grid`` in this process (as the simulation engine runs it); the summary,
    or the run's error re-raised (``missing`` when it recorded neither)."""
    outcome: dict = {}
    server_context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                             state=RecordDict(), run_config={})
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = TASK_ID, grid.run.run_id, SUPERLINK_NODE_ID
    try:
        with quiet_output(verbose):
            make_server_app(cfg, run_path, outcome)(grid, server_context)
    except Exception:  # recorded in ``outcome`` by the ServerApp, re-raised below as the Ray engine does
        pass
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
    return summary_of(outcome, missing)
