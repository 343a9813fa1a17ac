"""Seconds per federated round on the default config, and the share spent outside local training.

Run by hand (not in CI):

    .venv/bin/python benchmarks/round_time.py [--rounds 6] [KEY=VALUE ...]

Measures, in one run on the same machine:
  flower     the default config through Flower's simulation engine (Ray), rounds 2.. (round 1 also
             pays for the actors' start-up, reported apart);
  in-process the same cohorts trained one after another by the same client code in this process, with
             FedAvg and the same evaluation (the baseline);
and prints seconds per round for both, their ratio, and the engine's share of a Flower round:
1 − Σ client fit seconds / (parallel clients × seconds from sending the round to the last reply).
With ``--eval-every N`` it also runs Flower with ``eval.every=N`` and prints the mean seconds of all rounds
against the same mean with evaluation every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlt.config import load_config  # noqa: E402
from fedlt.evaluation import evaluate_model  # noqa: E402
from fedlt.experiment import augment_for, experiment_for, model_for  # noqa: E402
from fedlt.federation.runner import run_federated  # noqa: E402
from fedlt.federation.strategy import (
    round_lr,  # noqa: E402
    sample_cohort,  # noqa: E402
)
from fedlt.registry import CLIENTS  # noqa: E402
from fedlt.streams import Stream, torch_generator  # noqa: E402


def in_process_rounds(cfg: dict, rounds: int) -> list[float]:
    exp = experiment_for(cfg)
    test = exp.tensor_data("test")
    model = model_for(cfg, exp)
    method = CLIENTS.get(cfg.client.name)(cfg)
    times = []
    for t in range(1, rounds + 1):
        t0 = time.perf_counter()
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        states, sizes = [], []
        for pid in sample_cohort(cfg.seed, t, cfg.partition.num_clients, cfg.federation.fraction):
            model.load_state_dict(global_state)
            data = exp.client_data(pid)
            r = method.fit(model, data, {"lr": round_lr(cfg, t), "partition-id": pid},
                           torch_generator(cfg.seed, Stream.CLIENT, t, pid), augment_for(cfg, data))
            states.append(r.state)
            sizes.append(len(data))
        total = sum(sizes)
        model.load_state_dict({k: sum(s[k].double() * n / total for s, n in zip(states, sizes)).to(v.dtype)
                               for k, v in global_state.items()})
        evaluate_model(model, test, exp.train_counts, cfg.eval.batch_size)
        times.append(time.perf_counter() - t0)
    return times


def flower_rounds(cfg: dict) -> tuple[list[dict], float]:
    """metrics.jsonl rows of a Flower run of ``cfg`` and its wall-clock seconds (engine start included)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run_federated(cfg, str(Path(out) / "run"))
        total = time.perf_counter() - t0
        return [json.loads(x) for x in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=0, help="also time a run with eval.every=N")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # evaluation every round, as the in-process baseline does (configs/default.yaml evaluates every 4 rounds)
    cfg = load_config(args.config, ["mode=federated", f"federation.rounds={args.rounds}", "eval.every=1",
                                    *args.overrides])
    slots = max(1, int(torch.get_num_threads() // cfg.federation.client_cpus))
    torch.set_num_threads(torch.get_num_threads())
    experiment_for(cfg)

    rows, total = flower_rounds(cfg)
    steady = rows[1:] or rows
    flower = statistics.mean(r["seconds"] for r in steady)
    share = statistics.mean(1 - r["client_fit_seconds"] / (slots * r["train_seconds"]) for r in steady)
    baseline = in_process_rounds(cfg, args.rounds)
    base = statistics.mean(baseline[1:] or baseline)

    print(f"config: {args.config} {' '.join(args.overrides)}; {args.rounds} rounds, "
          f"{cfg.partition.num_clients} clients, fraction {cfg.federation.fraction}; "
          f"torch threads {torch.get_num_threads()}, parallel client actors {slots}")
    print(f"flower     round 1 (actor start-up): {rows[0]['seconds']:.2f} s; rounds 2+: {flower:.2f} s/round; "
          f"whole run incl. engine start {total:.1f} s")
    print(f"in-process rounds 2+: {base:.2f} s/round (baseline)")
    print(f"ratio flower / in-process: {flower / base:.2f}")
    print(f"engine share of a flower round (outside local training): {100 * share:.0f} %")
    if args.eval_every:
        sparse, _ = flower_rounds({**cfg, "eval": {**cfg.eval, "every": args.eval_every}})
        sparse_mean = statistics.mean(r["seconds"] for r in sparse[1:] or sparse)
        print(f"flower eval.every={args.eval_every}: rounds 2+: {sparse_mean:.2f} s/round; "
              f"ratio to eval.every={cfg.eval.every}: {sparse_mean / flower:.2f}")


if __name__ == "__main__":
    main()
