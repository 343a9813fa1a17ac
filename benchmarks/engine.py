"""Client-training throughput of the federation engines on the same cohorts, in one invocation.

Run by hand (not in CI):

    PYTHONPATH=. python benchmarks/engine.py --model resnet32 --clients-per-round 10 --batch 64 --rounds 2 \
        [--device cpu|cuda] [--local-steps S] [--engines flower,inprocess,fused,hosts] [--hosts H] [KEY=VALUE ...]

Each engine runs the same federated config (CIFAR-10-LT by default when its data are present, else
Fashion-MNIST-LT; FedAvg; K = clients-per-round clients, all sampled every round; 1 local epoch) through
``fedlt.federation.{runner,inprocess,fused}``; ``hosts`` is Flower's simulation engine with
``federation.hosts=H`` (default 1): H SuperNodes (Ray actors), each training its share of the cohort fused
(fedlt/federation/hosts.py), the scale-out form of ``fused``. Images per second = Σ over rounds 2.. of the images the
clients trained (one local epoch of each shard, or ``--local-steps`` full batches) / Σ of those rounds' ``train_seconds`` (send → aggregated
weights, so the engine's own messaging counts, evaluation does not). Round 1 is reported apart (start-up,
first-touch allocations). Prints one line per engine and the ratios to the Flower engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlt.config import load_config  # noqa: E402
from fedlt.experiment import experiment_for  # noqa: E402
from fedlt.federation.fused import run_fused  # noqa: E402
from fedlt.federation.inprocess import run_inprocess  # noqa: E402
from fedlt.federation.runner import run_federated  # noqa: E402

ENGINES = {"flower": run_federated, "inprocess": run_inprocess, "fused": run_fused, "hosts": run_federated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default=None, help="data set (default: cifar10 if present, else fashion_mnist)")
    ap.add_argument("--local-steps", type=int, default=None, help="local steps per round (default: one epoch)")
    ap.add_argument("--engines", default="flower,inprocess,fused")
    ap.add_argument("--hosts", type=int, default=1, help="host nodes of the engine `hosts` (default 1)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    k = args.clients_per_round
    base = [f"model.name={args.model}", f"partition.num_clients={k}", "federation.fraction=1.0",
            f"federation.rounds={args.rounds}", f"train.batch_size={args.batch}", "mode=federated",
            f"device={args.device}", f"eval.every={10 ** 6}", "partition.method=iid"]
    base.append(f"train.local_steps={args.local_steps}" if args.local_steps else "train.local_epochs=1")
    data = args.data
    if data is None:
        try:
            experiment_for(load_config(None, ["data.name=cifar10"]))
            data = "cifar10"
        except Exception:
            data = "fashion_mnist"
    cfg = load_config(None, base + [f"data.name={data}"] + args.overrides)
    exp = experiment_for(cfg)
    images = sum(len(p) for p in exp.parts)  # every client, one local epoch, every round
    if args.local_steps:
        assert min(len(p) for p in exp.parts) >= args.local_steps * args.batch, "shards smaller than the steps"
        images = k * args.local_steps * args.batch
    print(f"data {data} ({len(exp.train)} train images over {k} clients), model {args.model}, batch {args.batch}, "
          f"{args.rounds} rounds, device {args.device}", flush=True)
    rates = {}
    for name in args.engines.split(","):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            run_cfg = cfg.replace(federation=cfg.federation.model_copy(update={"hosts": args.hosts})) \
                if name == "hosts" else cfg
            ENGINES[name](run_cfg, str(Path(out) / "run"))
            wall = time.time() - t0
            rows = [json.loads(x) for x in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if r["round"] > 0]  # round 0: the initial model's evaluation
        later = [r["train_seconds"] for r in rows[1:]] or [rows[0]["train_seconds"]]
        rates[name] = images * len(later) / sum(later)
        print(f"{name:>9}: {rates[name]:8.0f} img/s (rounds 2..{args.rounds}; round 1 {rows[0]['train_seconds']:.1f} s; "
              f"whole run {wall:.1f} s)", flush=True)
    if "flower" in rates:
        print("ratios to flower: " + ", ".join(f"{n} {r / rates['flower']:.2f}x" for n, r in rates.items()))
    if "inprocess" in rates and "fused" in rates:
        print(f"fused / inprocess: {rates['fused'] / rates['inprocess']:.2f}x")


if __name__ == "__main__":
    main()
