"""Does fedlt's data path hold ImageNet-LT? A synthetic file list with ImageNet-LT's size, run by hand (not in CI).

ImageNet-LT (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019) has 115,846 training
images over 1,000 classes, 1,280 in the largest and 5 in the smallest. Its list file is not available offline, so
the per-class counts here are a synthetic profile with exactly those facts and ImageNet-LT's many / medium / few
split (385 / 479 / 136 classes; :func:`imagenet_lt_profile`), not ImageNet-LT's own per-class counts.
The images are generated JPEGs at 224 px (smooth random colour fields with noise; not photographs), or at
``--jpeg-size HxW`` (e.g. 375x500, ImageNet's typical size), resized to ``--size`` when decoded.

It reports: the image cache's build time and size (fedlt.data.image_cache), the resident memory (RSS and PSS)
of 10 processes that each build the experiment and take one client's shard (a Flower actor does this), against
decoding in each process (data.cache=false: measured with 2 processes at this scale), and the wall time of the
first and of a later round of ResNet-50 on a small cohort (in-process engine). ``--decode-devices cpu,cuda``
first builds the cache once per listed decoding device (``data.decode_device``: the CPU, or nvJPEG on the GPU),
each into its own folder from nothing, and reports each one's rate (``--decode-only``: only that); on the CPU
with one thread per core (fedlt's default) and, as the baseline in the same run, with one thread.
``--decode-peak`` reports the peak memory of decoding the training list into memory (``data.cache=false``),
each way in a fresh process: chunk by chunk (fedlt's) against the whole list in one call (the baseline).

    PYTHONPATH=. python benchmarks/imagenet_lt_scale.py --work /tmp/inlt --scale 0.05    # 5,792 images
    PYTHONPATH=. python benchmarks/imagenet_lt_scale.py --work /data/inlt                 # the full 115,846

``--scale`` multiplies every class count (at least 1 image per class). The generated tree is reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

CLASSES, N_MAX, N_MIN, TOTAL = 1000, 1280, 5, 115_846


def imagenet_lt_profile() -> np.ndarray:
    """1,000 class counts, 1,280 down to 5, summing to 115,846, with ImageNet-LT's many / medium / few split of
    385 / 479 / 136 classes (> 100, 20–100, < 20 training images): in each group the counts fall from its
    largest to its smallest value as n(r) = lo·(hi/lo)^((1−r)^p) over the rank r ∈ [0, 1] (p = 1, geometric,
    for medium and few; p solved for the total in the many group)."""
    def group(hi: int, lo: int, k: int, p: float) -> np.ndarray:
        r = np.linspace(0.0, 1.0, k)
        return np.round(lo * (hi / lo) ** ((1 - r) ** p)).astype(np.int64)

    rest = np.concatenate([group(100, 20, 479, 1.0), group(19, N_MIN, 136, 1.0)])
    lo, hi = 0.1, 50.0
    for _ in range(100):  # the many group's total falls as p grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if group(N_MAX, 101, 385, mid).sum() + rest.sum() > TOTAL else (lo, mid)
    n = np.concatenate([group(N_MAX, 101, 385, hi), rest])
    short = TOTAL - int(n.sum())  # rounding: the rest to as many many-shot classes, one each
    n[1:1 + abs(short)] += int(np.sign(short))
    assert n.sum() == TOTAL and n[0] == N_MAX and n[-1] == N_MIN and np.all(np.diff(n) <= 0)
    assert ((n > 100).sum(), ((n >= 20) & (n <= 100)).sum(), (n < 20).sum()) == (385, 479, 136)
    return n


TEST_LIST = "test_heldout.txt"  # not test.txt: trees generated before held-out test images are regenerated


def _write_class(args: tuple[str, int, int, int, int, int]) -> None:
    from torchvision.io import encode_jpeg

    root, c, count, height, width, seed = args
    g = torch.Generator().manual_seed(seed * 1_000_003 + c)
    folder = Path(root) / "train" / f"n{c:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        path = folder / f"{k}.JPEG"
        if path.exists():
            continue
        field = torch.rand(1, 3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)[0]
        img = (img * 200 + torch.rand(3, height, width, generator=g) * 55).to(torch.uint8)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        os.replace(tmp, path)


def generate(root: Path, counts: np.ndarray, shape: tuple[int, int], test_per_class: int, workers: int) -> None:
    """The image tree (JPEGs of ``shape`` = (height, width)) and train.txt / test_heldout.txt (``test_per_class``
    more images of each class, held out: fedlt refuses a test list that repeats training images)."""
    t0 = time.time()
    jobs = [(str(root), c, int(n) + test_per_class, *shape, 0) for c, n in enumerate(counts)]
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, _ in enumerate(pool.imap_unordered(_write_class, jobs), 1):
            if i % 100 == 0 or i == len(jobs):
                print(f"generate: {i}/{len(jobs)} classes ({time.time() - t0:.0f}s)", flush=True)
    train = [f"train/n{c:08d}/{k}.JPEG {c}" for c, n in enumerate(counts) for k in range(int(n))]
    test = [f"train/n{c:08d}/{k}.JPEG {c}" for c, n in enumerate(counts) for k in range(n, n + test_per_class)]
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / TEST_LIST).write_text("\n".join(test) + "\n")


def config(root: Path, cache: bool, cache_dir: Path, clients: int, size: int, extra: list[str] = ()):
    from fedlt.config import load_config

    return load_config(None, ["name=inlt", "data.name=imagenet_lt", f"data.root={root}", "data.profile=none",
                              f"data.test_list={TEST_LIST}", f"data.image_size={size}",
                              f"data.cache={str(cache).lower()}", f"data.cache_dir={cache_dir}",
                              f"partition.num_clients={clients}", "device=cpu", *extra])


def memory_kib() -> dict[str, int]:
    """This process's resident set (RSS), proportional set (PSS: shared pages divided among their users) and
    anonymous memory (private to it: what it costs beyond the page cache that all processes share). RSS counts
    the mapped cache file's page-cache folios in whole (often 2 MiB) pieces, so it overstates what a process
    that maps the cache holds."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            out[key.lower()] = int(value.split()[0])
    return out


def _actor(args: tuple[str, bool, str, int, int, int, object]) -> dict:
    """One client process: build the experiment, take shard ``pid``, report memory once all are built."""
    root, cache, cache_dir, clients, size, pid, barrier = args
    from fedlt.experiment import experiment_for

    torch.set_num_threads(1)
    exp = experiment_for(config(Path(root), cache, Path(cache_dir), clients, size))
    data = exp.client_data(pid % clients)
    barrier.wait()  # every process holds its experiment now: measure together
    mem = memory_kib()
    barrier.wait()
    return {**mem, "shard_images": len(data)}


def actors_memory(root: Path, cache: bool, cache_dir: Path, clients: int, size: int, n: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            return pool.map(_actor, [(str(root), cache, str(cache_dir), clients, size, k, barrier) for k in range(n)])


def summary(mem: list[dict], n: int) -> dict:
    return {"n": n, **{f"{k}_mib": [m[k] // 1024 for m in mem] for k in ("rss", "pss", "anonymous")}}


def said(s: dict) -> str:
    return ", ".join(f"{k.split('_')[0]} {np.mean(v):.0f} MiB" for k, v in s.items() if k != "n") + " each (mean)"


def decode_rate(root: Path, size: int, device: str, cache_dir: Path, threads: int) -> dict:
    """Build the train list's cache from nothing with JPEGs decoded on ``device`` by ``threads`` threads:
    seconds and images/s. The decoder's start-up (imports; on the GPU the CUDA context and nvJPEG's handles) is
    paid once per process before the clock starts."""
    import shutil

    from fedlt.data.image_cache import cached_images
    from fedlt.data.sources import decode_images, read_file_list

    paths, _ = read_file_list(str(root), "train.txt", CLASSES)
    decode_images(paths[:8], size, device)
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.time()
    images = cached_images(paths, size, decode_images, cache_dir, device, threads=threads)
    seconds = time.time() - t0
    shutil.rmtree(cache_dir, ignore_errors=True)
    out = {"seconds": round(seconds, 2), "images_per_second": round(len(images) / seconds, 1), "threads": threads}
    print(f"decode on {device}, {threads} thread(s): {len(images):,} images in {seconds:.1f}s "
          f"({out['images_per_second']:,.0f} img/s)", flush=True)
    return out


def _peak_child(args: tuple[str, int, bool]) -> dict:
    import resource

    from fedlt.data.image_cache import decoded_images
    from fedlt.data.sources import decode_images, read_file_list

    root, size, chunked = args
    paths, _ = read_file_list(root, "train.txt", CLASSES)
    decode_images(paths[:8], size)  # imports and the decoder's start-up, before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    images = decoded_images(paths, size, decode_images) if chunked else decode_images(paths, size)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"peak_growth_mib": round(grew / 1024), "result_mib": round(images.numel() / 2**20)}


def decode_peak(root: Path, size: int) -> dict:
    """Peak RSS growth of decoding the training list into memory, each way in a fresh process."""
    out = {}
    for name, chunked in (("whole_list", False), ("chunked", True)):
        with mp.get_context("spawn").Pool(1) as pool:
            out[name] = pool.apply(_peak_child, ((str(root), size, chunked),))
        print(f"decode into memory, {name}: result {out[name]['result_mib']:,} MiB, peak growth "
              f"{out[name]['peak_growth_mib']:,} MiB", flush=True)
    ratio = out["whole_list"]["peak_growth_mib"] / max(out["chunked"]["peak_growth_mib"], 1)
    print(f"decode into memory: ratio whole list / chunked peak = {ratio:.2f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the generated images and the cache")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of every class count (default: all)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--jpeg-size", default="", help="HxW of the generated JPEGs, resized to --size on decode "
                                                  "(ImageNet's are ≈ 375x500; default: --size square)")
    p.add_argument("--test-per-class", type=int, default=2)
    p.add_argument("--actors", type=int, default=10)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--cohort", type=int, default=2, help="clients per round of the ResNet-50 rounds")
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="processes generating images")
    p.add_argument("--rounds", type=int, default=3, help="ResNet-50 rounds to time (0: skip them)")
    p.add_argument("--decode-devices", default="", help="comma-separated decoding devices to time (cpu,cuda)")
    p.add_argument("--decode-only", action="store_true", help="time the decoding devices, then stop")
    p.add_argument("--decode-peak", action="store_true", help="peak memory of decoding into memory, two ways")
    args = p.parse_args(argv)

    work = Path(args.work)
    counts = np.maximum(np.round(imagenet_lt_profile() * args.scale).astype(np.int64), 1)
    shape = tuple(int(v) for v in args.jpeg_size.split("x")) if args.jpeg_size else (args.size, args.size)
    px = f"{args.size}px" if shape == (args.size, args.size) else f"{shape[0]}x{shape[1]}to{args.size}px"
    root, cache_dir = work / f"images-scale{args.scale:g}-{px}", work / "cache"
    print(f"profile: {len(counts)} classes, {counts.max()} → {counts.min()}, {counts.sum():,} training images "
          f"(scale {args.scale:g}); {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    if not (root / TEST_LIST).is_file():
        generate(root, counts, shape, args.test_per_class, args.workers)

    from fedlt.data.sources import load_file_list

    result: dict = {"images": int(counts.sum()), "size": args.size}
    from fedlt.data.image_cache import decode_threads

    for device in filter(None, args.decode_devices.split(",")):
        result[f"decode_{device}"] = decode_rate(root, args.size, device, work / f"cache-{device}",
                                                 decode_threads(device))
        if device == "cpu" and decode_threads(device) > 1:  # the baseline: one thread, in the same run
            one = decode_rate(root, args.size, device, work / "cache-cpu", 1)
            result["decode_cpu_one_thread"] = one
            ratio = result["decode_cpu"]["images_per_second"] / one["images_per_second"]
            print(f"decode on cpu: ratio {decode_threads(device)} threads / 1 thread = {ratio:.2f}x", flush=True)
    if args.decode_peak:
        result["decode_peak"] = decode_peak(root, args.size)
    if args.decode_only:
        print(json.dumps(result))
        return 0
    t0 = time.time()
    splits = load_file_list(str(root), "train.txt", TEST_LIST, args.size, CLASSES, cache=True, cache_dir=str(cache_dir))
    train = splits["train"].materialize()
    splits["test"].materialize()
    built = time.time() - t0
    size_gib = sum(f.stat().st_size for f in cache_dir.glob("*.u8")) / 2**30
    result.update(cache_build_seconds=round(built, 1), cache_gib=round(size_gib, 3),
                  train_tensor_gib=round(train.images.numel() / 2**30, 3))
    print(f"cache: built (or found) in {built:.1f}s, {size_gib:.2f} GiB on disk", flush=True)

    mem = actors_memory(root, True, cache_dir, args.clients, args.size, args.actors)
    result["cached_actors"] = summary(mem, args.actors)
    print(f"{args.actors} processes mapping the cache: {said(result['cached_actors'])}", flush=True)
    mem = actors_memory(root, False, cache_dir, args.clients, args.size, 2)
    result["decoding_actors"] = summary(mem, 2)
    print(f"2 processes decoding (data.cache=false): {said(result['decoding_actors'])}", flush=True)

    if args.rounds == 0:
        (work / f"result-scale{args.scale:g}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return 0
    from fedlt.federation.inprocess import run_inprocess

    rounds = args.rounds
    cfg = config(root, True, cache_dir, args.clients, args.size, [
        "mode=federated", "model.name=resnet50", "federation.engine=inprocess", f"federation.rounds={rounds}",
        f"federation.fraction={args.cohort / args.clients}", f"train.local_steps={args.local_steps}",
        f"train.batch_size={args.batch}", f"eval.every={rounds + 1}", "eval.batch_size=64"])
    out = work / "runs" / f"scale{args.scale:g}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    run_inprocess(cfg, str(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["train_seconds"] for r in rows if r.get("round", 0) >= 1]
    result["round_seconds"] = [round(s, 1) for s in secs]
    print(f"ResNet-50, {args.cohort} clients × {args.local_steps} steps of {args.batch}: round 1 {secs[0]:.1f}s, "
          f"later rounds {np.mean(secs[1:]):.1f}s", flush=True)
    (work / f"result-scale{args.scale:g}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
