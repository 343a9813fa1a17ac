"""The fused engine's batch assembly: one client at a time against the whole group at once, in one invocation.

Run by hand (not in CI):

    PYTHONPATH=. python benchmarks/group_batch.py [--device cpu|cuda] [--clients 10,50] [--batch 64] [--steps 50]

Per fused step the trainer needs every client's batch: gathered by index from the client's shard, normalised,
randomly cropped (padding 4) and flipped. ``per client``: :func:`fedlt.train.prepare_batch` of each client's
batch from its own generator, then one stack (the fused engine's assembly before group_batch). ``group``:
:func:`fedlt.federation.fused.client_draws` per client (the same random numbers, drawn on the CPU), then one
:func:`fedlt.federation.fused.group_batch` for the group (a gather per client into one buffer, then one
crop and flip of the uint8 images and one normalisation). Both give the same tensors (checked here on the first
step, and in tests/test_fused.py). CIFAR-sized shards (3×32×32 uint8, 250 images per client) on the device;
milliseconds per step are the median of ``--repeats`` timed passes of ``--steps`` steps after one warm-up pass;
the ratio is per client / group, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlt.federation.fused import client_draws, group_batch  # noqa: E402
from fedlt.train import Augment, OptimConfig, TensorData, batch_schedule  # noqa: E402


def shards(k: int, device: torch.device, n: int = 250) -> list[TensorData]:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.49, 0.48, 0.45], device=device), torch.tensor([0.25, 0.24, 0.26], device=device)
    return [TensorData(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device),
                       torch.randint(0, 10, (n,), generator=g).to(device), mean, std, 10) for _ in range(k)]


def per_client(datas, opt, augment, steps: int) -> torch.Tensor:
    streams = [batch_schedule(d, opt, epochs=None, steps=steps, generator=torch.Generator().manual_seed(j),
                              augment=augment) for j, d in enumerate(datas)]
    for _ in range(steps):
        batches = [next(s) for s in streams]
        x = torch.stack([b[0] for b in batches])
    return x


def grouped(datas, opt, augment, steps: int) -> torch.Tensor:
    streams = [client_draws(d, opt, torch.Generator().manual_seed(j), augment, epochs=None, steps=steps)
               for j, d in enumerate(datas)]
    for _ in range(steps):
        picks = [next(s)[:2] for s in streams]
        x, _ = group_batch(datas, picks, augment)
    return x


def timed(fn, sync, repeats: int) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", default="10,50", help="comma-separated cohort sizes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt = OptimConfig(lr=0.1, batch_size=args.batch)
    print(f"device {device}, batch {args.batch}, {args.steps} steps, torch threads {torch.get_num_threads()}")
    for k in (int(c) for c in args.clients.split(",")):
        datas = shards(k, device)
        augment = Augment(4, True, datas[0].mean, datas[0].std)
        a, b = per_client(datas, opt, augment, 1), grouped(datas, opt, augment, 1)
        if not torch.equal(a.to(b.dtype).contiguous(), b.contiguous()):
            raise SystemExit(f"{k} clients: the group's batch differs from the clients' own batches")
        one = timed(lambda: per_client(datas, opt, augment, args.steps), sync, args.repeats) / args.steps
        grp = timed(lambda: grouped(datas, opt, augment, args.steps), sync, args.repeats) / args.steps
        print(f"{k:3d} clients: per client {1e3 * one:7.2f} ms/step, group {1e3 * grp:7.2f} ms/step, "
              f"ratio {one / grp:5.2f}x")


if __name__ == "__main__":
    main()
