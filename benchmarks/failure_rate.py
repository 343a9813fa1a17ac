"""FedAvg under injected client failures: accuracy and few-shot accuracy at several ``federation.failure_rate``
values against the failure-free run, on the default config (in-process engine, one run per rate).

Run by hand (not in CI):

    .venv/bin/python benchmarks/failure_rate.py [--rates 0 0.1 0.3 0.5] [--out runs/failure_rate] [KEY=VALUE ...]

Each sampled client fails in a round with probability ``failure_rate`` (drawn from its own stream, seeded by
(seed, round, partition id)); a failed client's update is left out of the round's average
(``federation.max_failures`` is raised so that no run stops). Prints one row per rate: accuracy, balanced
accuracy, few-shot accuracy, failures counted in summary.json, and the clients aggregated over the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlt.config import load_config
from fedlt.errors import ClientFailure
from fedlt.federation.inprocess import run_inprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    parser.add_argument("--out", default="runs/failure_rate")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    for rate in args.rates:
        cfg = load_config(args.config, ["mode=federated", "federation.max_failures=100000",
                                        f"federation.failure_rate={rate}", *args.overrides])
        path = Path(args.out) / f"rate{rate:g}"
        try:
            summary = run_inprocess(cfg, str(path))
        except ClientFailure as exc:  # every sampled client failed in some round: the run stops there
            print(f"failure_rate {rate:g}: {exc}", flush=True)
            continue
        metrics = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        aggregated = sum(len(r["clients"]) for r in metrics)
        rows.append((rate, summary["accuracy"], summary["balanced_accuracy"], summary["few"],
                     summary["failures"]["total"], aggregated))
    print(f"{'failure_rate':>12} {'acc':>6} {'bal':>6} {'few':>6} {'failures':>8} {'aggregated':>10}")
    for rate, acc, bal, few, failures, aggregated in rows:
        print(f"{rate:12g} {100 * acc:6.2f} {100 * bal:6.2f} {100 * few:6.2f} {failures:8d} {aggregated:10d}")


if __name__ == "__main__":
    main()
