"""Decode a file-list split once into an on-disk uint8 cache that every process memory-maps read-only.

A federated simulation builds the same experiment in every client process (each Flower/Ray actor, the fused
engine, the server): decoding ImageNet-LT's 115,846 JPEGs at 224 px in each of them costs ≈17 GB of memory per
process and minutes of CPU. Instead the first process decodes the chosen images into one file per (image list,
size) and the others map it:

    <cache_dir>/<key>-<N>x3x<S>x<S>.u8     N images, uint8, C×H×W each, in list order
    <cache_dir>/<key>-<N>x3x<S>x<S>.json   what the key was made of (for a person reading the folder), and the
                                          SHA-256 of each DIGEST_PIECE bytes of the .u8 file, taken as it is built
                                          (a run's data fingerprint, :func:`fedlt.run_loop.data_fingerprint`)

``key`` is a SHA-256 over the image size and, per image, its path, byte size and modification time: a changed
list, a replaced image or another size makes a new file (old ones are left for the user to delete: the folder
is a cache). The file is written under another name and renamed when complete, under an exclusive lock, so
concurrent processes build it once and never read a half-written one. Pages of the mapping live in the page
cache, shared by every process that maps the file (``torch.from_file(..., shared=False)`` maps it privately:
a write would copy the page, never change the file).

Decoding reads the file bytes and decodes JPEGs in batches with ``torchvision.io.decode_jpeg`` on
``decode_device`` (``cuda``: nvJPEG on the GPU, one batch of 256 at a time); other formats, and JPEGs the batch
decoder refuses, go through ``decode_image`` on the CPU. On the CPU, chunks of 64 images are decoded by one
thread per core this process may run on (``os.sched_getaffinity``; torchvision's decoders release the GIL),
at most two chunks per thread ahead of the writer, and written in list order: the file is the same as one
thread's, byte for byte, and the first undecodable image in list order is the one named.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlt.errors import FedLTError

CACHE_ENV = "FEDLT_CACHE_DIR"
DIGEST_PIECE = 64 * 2**20  # bytes of images hashed as one piece (a thread each): the same digest on any machine


@dataclass(frozen=True)
class CachedImages:
    """A cache file mapped: the images, and the SHA-256 of each :data:`DIGEST_PIECE` bytes of them as the file
    was built (:func:`piece_digests`; None for a file whose .json does not hold them, e.g. of an earlier fedlt)."""

    images: torch.Tensor
    piece_digests: tuple[bytes, ...] | None


def default_cache_dir() -> Path:
    """``$FEDLT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedlt/images``, else ``~/.cache/fedlt/images``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlt" / "images"


def cache_key(paths: list[str], size: int | None) -> str:
    """SHA-256 (first 20 hex digits) of the size and every image's path, byte size and mtime (ns); a missing
    image is left to the decoder, which names it."""
    h = hashlib.sha256(f"fedlt-image-cache-v1 size={size}\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:20]


def decode_threads(decode_device: str) -> int:
    """Threads decoding a cache: one per core this process may run on for the CPU (``os.cpu_count()`` where
    the OS has no affinity call, e.g. macOS), one for a GPU."""
    if decode_device != "cpu":
        return 1
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def piece_digests(images: torch.Tensor, threads: int | None = None) -> tuple[bytes, ...]:
    """SHA-256 of each :data:`DIGEST_PIECE` bytes of ``images`` (flattened, as uint8), in order; hashed by
    ``threads`` threads at once (default one per core, :func:`decode_threads`: hashlib lets go of the GIL)."""
    flat = memoryview(images.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    pieces = [flat[i:i + DIGEST_PIECE] for i in range(0, len(flat), DIGEST_PIECE)]
    threads = min(len(pieces), decode_threads("cpu") if threads is None else threads)
    if threads <= 1:
        return tuple(hashlib.sha256(p).digest() for p in pieces)
    with ThreadPoolExecutor(threads, thread_name_prefix="fedlt-digest") as pool:
        return tuple(pool.map(lambda p: hashlib.sha256(p).digest(), pieces))


def cached_images(paths: list[str], size: int | None, decode, cache_dir: str | Path | None = None,
                  decode_device: str = "cpu", label: str = "images", threads: int | None = None) -> torch.Tensor:
    """The images of ``paths`` as one uint8 tensor (N, C, H, W) mapped from the cache, built first if missing
    (:func:`load_cached`'s images)."""
    return load_cached(paths, size, decode, cache_dir, decode_device, label, threads).images


def load_cached(paths: list[str], size: int | None, decode, cache_dir: str | Path | None = None,
                decode_device: str = "cpu", label: str = "images", threads: int | None = None) -> CachedImages:
    """The images of ``paths`` mapped from the cache, built first if missing, with the digests of their pieces.

    ``decode(paths, size, device) -> uint8 tensor`` decodes a chunk (:func:`fedlt.data.sources.decode_images`);
    the shape of an image (C, H, W) comes from the first chunk. ``label`` names the split in the progress lines;
    ``threads`` decode at once (default :func:`decode_threads`).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size)
    done = sorted(folder.glob(f"{key}-{len(paths)}x*.u8"))
    if not done:
        with open(folder / f"{key}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same file: wait for it
            done = sorted(folder.glob(f"{key}-{len(paths)}x*.u8"))
            if not done:
                threads = decode_threads(decode_device) if threads is None else threads
                done = [_build(folder, key, paths, size, decode, decode_device, label, threads)]
    file = done[0]
    shape = tuple(int(x) for x in file.stem.split("-", 1)[1].split("x"))
    numel = 1
    for d in shape:
        numel *= d
    if file.stat().st_size != numel:
        raise OSError(f"image cache file {file} has {file.stat().st_size} bytes, expected {numel}: delete it")
    images = torch.from_file(str(file), shared=False, size=numel, dtype=torch.uint8).view(shape)
    return CachedImages(images, _recorded_digests(file.with_suffix(".json"), numel))


def _recorded_digests(record: Path, numel: int) -> tuple[bytes, ...] | None:
    """The piece digests a cache file's .json records (``piece_sha256``), where it holds one 64-hex-digit string
    per :data:`DIGEST_PIECE` bytes of the file; None where it does not (written by an earlier fedlt, edited,
    unreadable): the caller then hashes the images itself."""
    try:
        digests = json.loads(record.read_text()).get("piece_sha256")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    pieces = -(-numel // DIGEST_PIECE)
    if not isinstance(digests, list) or len(digests) != pieces or not all(
            isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in digests):
        return None
    return tuple(bytes.fromhex(d) for d in digests)


def _build(folder: Path, key: str, paths: list[str], size: int | None, decode, decode_device: str,
           label: str, threads: int) -> Path:
    """Decode ``paths`` chunk by chunk into ``<key>.partial``, then rename it to its final name."""
    n, t0 = len(paths), time.time()
    tmp = folder / f"{key}.partial"
    chunks = _decoded(paths, size, decode, decode_device, threads)
    try:
        shape = _write(tmp, chunks, n, label, folder)
    except BaseException:
        chunks.close()  # the decoding threads stop (queued chunks cancelled) before the file goes
        tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        raise
    final = folder / f"{key}-{n}x{'x'.join(str(d) for d in shape)}.u8"
    numel = tmp.stat().st_size  # (the file was just written: its pages are still in the page cache)
    digests = piece_digests(torch.from_file(str(tmp), shared=False, size=numel, dtype=torch.uint8))
    (folder / f"{final.stem}.json").write_text(json.dumps(
        {"images": n, "shape": list(shape), "size": size, "first": paths[0], "last": paths[-1],
         "built_seconds": round(time.time() - t0, 1), "decode_device": decode_device, "threads": threads,
         "piece_bytes": DIGEST_PIECE, "piece_sha256": [d.hex() for d in digests]}, indent=1))
    os.replace(tmp, final)
    return final


def _decoded(paths: list[str], size: int | None, decode, decode_device: str, threads: int,
             chunk: int | None = None) -> Generator[torch.Tensor, None, None]:
    """The chunks of ``paths`` decoded, in list order; by ``threads`` threads at once, at most two chunks per
    thread ahead of the consumer (the memory held is bounded). An error is raised at its chunk's turn; the
    chunks still queued are cancelled. ``chunk``: images per chunk (default 256 for nvJPEG, which decodes a
    batch at once, 64 on the CPU, where the threads share the work)."""
    chunk = chunk or (64 if decode_device == "cpu" else 256)
    starts = range(0, len(paths), chunk)
    if threads <= 1:
        for start in starts:
            yield decode(paths[start:start + chunk], size, decode_device)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="fedlt-decode")
    try:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(decode, paths[start:start + chunk], size, decode_device))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """One line on stderr at every 10 % of ``n`` images: done, rate, time left, where they go; none before
    ``quiet_seconds`` have passed (a decode that quick needs no progress)."""

    def __init__(self, n: int, label: str, where: str, prefix: str = "", quiet_seconds: float = 0.0) -> None:
        self.n, self.label, self.where, self.prefix, self.quiet = n, label, where, prefix, quiet_seconds
        self.t0, self.shown, self.done = time.time(), -1, 0

    def add(self, k: int) -> None:
        self.done += k
        pct = self.done * 100 // self.n
        if time.time() - self.t0 < self.quiet:
            return
        if pct // 10 != self.shown // 10 or self.done == self.n:
            self.shown = pct
            rate = self.done / max(time.time() - self.t0, 1e-9)
            print(f"{self.prefix}decoding {self.label} {self.done:,}/{self.n:,} ({pct}%, {rate:,.0f} img/s, "
                  f"eta {(self.n - self.done) / rate:.0f}s) {self.where}", file=sys.stderr, flush=True)


def _same_shape(shape: tuple[int, ...] | None, images: torch.Tensor) -> tuple[int, ...]:
    """The image shape (C, H, W) of a list: the first chunk's; a later chunk of another shape is an error."""
    if shape is not None and tuple(images.shape[1:]) != shape:
        raise FedLTError(f"images of shapes {shape} and {tuple(images.shape[1:])} in one list: set "
                         f"data.image_size to resize them to one size")
    return tuple(images.shape[1:])


def _write(tmp: Path, chunks: Iterator[torch.Tensor], n: int, label: str, folder: Path) -> tuple[int, ...]:
    progress, shape = _Progress(n, label, f"-> {folder}", prefix="image cache: "), None
    with open(tmp, "wb") as f:
        for images in chunks:
            shape = _same_shape(shape, images)
            f.write(images.contiguous().cpu().numpy().tobytes())
            progress.add(len(images))
        f.flush()
        os.fsync(f.fileno())
    assert shape is not None
    return shape


def decoded_images(paths: list[str], size: int | None, decode, decode_device: str = "cpu",
                   label: str = "images", threads: int | None = None, quiet_seconds: float = 2.0) -> torch.Tensor:
    """The images of ``paths`` decoded into one uint8 tensor in this process's memory (``data.cache=false``),
    chunk by chunk as a cache is built (:func:`_decoded`: threads, list order), so that at most a few chunks
    of full-size decoded images are held beside the result (decoding the whole list at once held every image at
    its original size: ≈ 65 GB for ImageNet-LT's 115,846 images of ≈ 375 × 500). Progress lines on stderr
    once it has taken ``quiet_seconds``."""
    threads = decode_threads(decode_device) if threads is None else threads
    progress = _Progress(len(paths), label, "into memory (data.cache=false)", quiet_seconds=quiet_seconds)
    shape, out = None, None
    for images in _decoded(paths, size, decode, decode_device, threads):
        shape = _same_shape(shape, images)
        if out is None:
            out = torch.empty((len(paths), *shape), dtype=torch.uint8)
        out[progress.done:progress.done + len(images)] = images.cpu()
        progress.add(len(images))
    assert out is not None
    return out
