"""The Flower boundary of a round, per client: its weights decoded from the message, its reply encoded, and the
server's weighted mean of the replies — Flower's own conversions against fedlt's, in one run.

Run by hand (not in CI):

    PYTHONPATH=. python benchmarks/boundary.py [--models resnet32,resnet32_experts] [--clients 20] [--repeats 5]

Flower's: ``ArrayRecord(state)`` (``np.save`` per array), ``ArrayRecord.to_torch_state_dict`` (``np.load`` per
array) and ``aggregate_arrayrecords``; fedlt's: :func:`fedlt.federation.records.to_arrays`, ``to_state`` (the
.npy header made / parsed once per layout) and :func:`fedlt.federation.strategy.weighted_mean_arrays` — the same
bytes (tests/test_records.py). Milliseconds per client (median of ``--repeats``) and the ratios. What a fused
round costs beyond its training is these, plus the model's ``load_state_dict`` (on the CPU a copy per tensor)
and, for a message a ClientApp answers, the in-process grid's deep copies of it and its reply (the fused
trainer's are not copied), which this does not time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402

from fedlt.errors import FedLTError  # noqa: E402
from fedlt.federation.records import to_arrays, to_state  # noqa: E402
from fedlt.federation.strategy import weighted_mean_arrays  # noqa: E402
from fedlt.models import build_model  # noqa: E402


def ms(fn, repeats: int, per: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet32,resnet32_experts")
    ap.add_argument("--clients", type=int, default=20, help="replies aggregated")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.clients < 1 or args.repeats < 1:
        ap.error("--clients and --repeats must be at least 1")
    k = args.clients
    for name in args.models.split(","):
        try:
            state = build_model(name, 100, 3).state_dict()
        except FedLTError as exc:
            raise SystemExit(f"error: {exc}") from None
        arrays = to_arrays(state)
        replies = [RecordDict({"arrays": to_arrays(state), "metrics": MetricRecord({"num-examples": 50 + j})})
                   for j in range(k)]
        rows = [("encode a reply", lambda: ArrayRecord(state), lambda: to_arrays(state), 1),
                ("decode a message", lambda: arrays.to_torch_state_dict(), lambda: to_state(arrays), 1),
                (f"aggregate {k} replies", lambda: aggregate_arrayrecords(replies, "num-examples"),
                 lambda: weighted_mean_arrays(replies, "num-examples"), k)]
        print(f"{name}: {len(state)} arrays, {sum(v.numel() for v in state.values()) / 1e6:.2f} M values")
        for label, flower, ours, per in rows:
            a, b = ms(flower, args.repeats, per), ms(ours, args.repeats, per)
            print(f"  {name} {label:22s} ms per client: flower {a:6.2f}, fedlt {b:6.2f} ({a / b:4.1f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
