"""The federated round loop: discover nodes, set up the strategy, train, evaluate, checkpoint, resume.

The loop calls the strategy's Flower hooks (``configure_train`` / ``aggregate_train``) itself rather
than ``Strategy.start`` so that a run can resume from its checkpoint at any round and write its own
records; a round is exactly what ``Strategy.start`` does, minus federated evaluation.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlt.config import Config
from fedlt.device import environment, resolve_device
from fedlt.errors import FedLTError
from fedlt.evaluation import due, evaluate_model, metrics_row, progress_line
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.records import load_into, to_arrays
from fedlt.federation.strategy import FedLTStrategy, round_lr
from fedlt.registry import STRATEGIES
from fedlt.rundir import RunDir


def discover_nodes(grid: Grid, num_clients: int, timeout: float = 120.0) -> dict[int, int]:
    """Ask every node for its ``partition-id``; return partition id -> node id."""
    deadline = time.time() + timeout
    while len(list(grid.get_node_ids())) < num_clients:
        if time.time() > deadline:
            raise FedLTError(f"only {len(list(grid.get_node_ids()))} of {num_clients} client nodes connected")
        time.sleep(0.2)
    node_ids = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"action": "partition-id"})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in node_ids]
    node_of = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition:\n{reply.error.reason}")
        pid = int(reply.content["metrics"]["partition-id"])
        node_of[pid] = reply.metadata.src_node_id
    if sorted(node_of) != list(range(num_clients)):
        raise FedLTError(f"nodes report partitions {sorted(node_of)}, expected 0..{num_clients - 1}: "
                         f"start one node per partition")
    return node_of


def run_rounds(grid: Grid, cfg: Config, run: RunDir) -> dict:
    """Run (or resume) the federated part of ``cfg`` into ``run``; return the summary."""
    exp = experiment_for(cfg)
    device = resolve_device(cfg.device)
    model = model_for(cfg, exp)
    strategy: FedLTStrategy = STRATEGIES.get(cfg.strategy.name)(cfg, exp.num_classes)
    strategy.bind(discover_nodes(grid, cfg.partition.num_clients))
    test = exp.tensor_data("test", device=device)
    rounds = cfg.federation.rounds

    ckpt = run.load_checkpoint() if run.same_config(cfg) else None
    if ckpt is None:
        run.reset()
        run.write_config(cfg)
        run.write_env(environment(device))
        run.write_partition(exp.partition_counts(), exp.train_counts, exp.test.class_counts, cfg.partition.method)
        arrays, start, elapsed = strategy.setup(grid, to_arrays(model.state_dict())), 1, 0.0
    else:
        strategy.load_state_dict(ckpt["strategy"])
        arrays, start, elapsed = to_arrays(ckpt["model"]), ckpt["round"] + 1, ckpt["elapsed"]
        run.truncate_metrics("round", ckpt["round"])
        print(f"[federated {cfg.strategy.name}] resuming after round {ckpt['round']}", flush=True)

    strategy.global_arrays = arrays
    for server_round in range(start, rounds + 1):
        t0 = time.time()
        config = ConfigRecord({"lr": round_lr(cfg, server_round)})
        strategy.fit_seconds = 0.0
        new_arrays, train_metrics = strategy.run_round(server_round, arrays, config, grid)
        t_train = time.time() - t0
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: no client returned weights")
        arrays = strategy.global_arrays = new_arrays
        load_into(model, arrays)
        metrics = None
        if due(server_round, rounds, cfg.eval.every):
            metrics = evaluate_model(strategy.eval_model(model), test, exp.train_counts, cfg.eval.batch_size,
                                     strategy.transform_logits, with_bins=server_round == rounds)
        seconds = time.time() - t0
        elapsed += seconds
        train_loss = (train_metrics or {}).get("train_loss")
        row = {"round": server_round, **(metrics_row(metrics) if metrics else {}), "train_loss": train_loss,
               "clients": strategy.last_cohort, "seconds": seconds, "train_seconds": t_train,
               "client_fit_seconds": strategy.fit_seconds}
        run.append_metrics(row)
        print(progress_line(f"[federated {cfg.strategy.name}] round {server_round}/{rounds}", metrics, seconds,
                            train_loss), flush=True)
        if due(server_round, rounds, cfg.federation.checkpoint_every):
            run.save_checkpoint({"round": server_round, "model": model.state_dict(),
                                 "strategy": strategy.state_dict(), "elapsed": elapsed})

    if start > rounds:  # a finished run started again: no round ran (else the last round's metrics, with bins)
        load_into(model, arrays)
        metrics = evaluate_model(strategy.eval_model(model), test, exp.train_counts, cfg.eval.batch_size,
                                 strategy.transform_logits, with_bins=True)
    summary = {"mode": "federated", "method": cfg.strategy.name, "client": cfg.client.name,
               "seed": cfg.seed, "rounds": rounds, "wall_clock_seconds": elapsed,
               "train_class_counts": exp.train_counts.tolist(), **metrics, **strategy.summary_extras()}
    run.write_summary(summary)
    return summary
