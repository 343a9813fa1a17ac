"""The on-disk image cache of file-list data sets (fedlt.data.image_cache), on a few generated images."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, write_png

from fedlt.config import load_config
from fedlt.data import sources
from fedlt.data.image_cache import _decoded, cache_key, cached_images, decoded_images
from fedlt.errors import FedLTError
from fedlt.experiment import build_experiment, experiment_for


def make_images(root: Path, n: int = 12, size: int = 16, classes: int = 3) -> list[str]:
    """``n`` random images under ``root`` (JPEGs, one PNG), and train.txt listing them; test.txt lists held-out
    copies of the first six under ``root/test``."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        img = torch.randint(0, 256, (3, size, size + (i % 2) * 4), dtype=torch.uint8, generator=g)
        rel = f"c{i % classes}/{i}.{'png' if i == 5 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if i == 5:
            write_png(img, str(root / rel))
        else:
            (root / rel).write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        lines.append(f"{rel} {i % classes}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    for line in lines[:6]:  # held-out copies: a test list may not repeat training images
        rel = line.split()[0]
        (root / "test" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "test" / rel).write_bytes((root / rel).read_bytes())
    (root / "test.txt").write_text("".join(f"test/{line}\n" for line in lines[:6]))
    return [str(root / line.split()[0]) for line in lines]


class CountingDecoder:
    def __init__(self) -> None:
        self.images = 0

    def __call__(self, paths, size, device):
        self.images += len(paths)
        return sources.decode_images(paths, size, device)


def test_built_once_then_mapped_with_the_decoded_pixels(tmp_path, capsys):
    paths = make_images(tmp_path / "img")
    decode = CountingDecoder()
    first = cached_images(paths, 12, decode, tmp_path / "cache")
    assert decode.images == len(paths) and first.shape == (12, 3, 12, 12) and first.dtype == torch.uint8
    assert torch.equal(first, sources.decode_images(paths, 12))  # the same pixels as decoding in memory
    assert "image cache: decoding" in capsys.readouterr().err  # progress while it is built
    again = cached_images(paths, 12, decode, tmp_path / "cache")
    assert decode.images == len(paths) and torch.equal(again, first)  # mapped, not decoded again
    files = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert files == [f"{cache_key(paths, 12)}-12x3x12x12.json", f"{cache_key(paths, 12)}-12x3x12x12.u8"]
    # the mapping is private: writing into the tensor changes neither the file nor another mapping
    again[0].zero_()
    assert torch.equal(cached_images(paths, 12, decode, tmp_path / "cache"), first)


class SlowFirstChunks:
    """A decoder whose earlier chunks take longer (so threads finish out of order) and that records how many
    chunks were started before the first was taken, and which chunk fails."""

    def __init__(self, fail: set[int] = frozenset()) -> None:
        self.started, self.fail, self.lock = [], fail, threading.Lock()

    def __call__(self, paths, size, device):
        with self.lock:
            k = len(self.started)
            self.started.append(k)
        time.sleep(0.02 * max(0, 3 - k))
        if k in self.fail:
            raise FedLTError(f"chunk {k} failed")
        return sources.decode_images(paths, size, device)


def test_threads_decode_chunks_in_list_order(tmp_path):
    paths = make_images(tmp_path / "img")
    decode = SlowFirstChunks()
    chunks = _decoded(paths, 12, decode, "cpu", threads=3, chunk=2)
    first = next(chunks)
    assert 1 <= len(decode.started) <= 6  # at most two chunks per thread ahead of the writer
    assert torch.equal(torch.cat([first, *chunks]), sources.decode_images(paths, 12))
    assert len(decode.started) == 6
    # the first failing chunk in list order is the one reported, whichever thread failed first
    failing = _decoded(paths, 12, SlowFirstChunks(fail={1, 3}), "cpu", threads=3, chunk=2)
    with pytest.raises(FedLTError, match="chunk 1 failed"):
        list(failing)


def test_decode_threads_without_an_affinity_call(monkeypatch):
    from fedlt.data.image_cache import decode_threads

    assert decode_threads("cpu") == len(os.sched_getaffinity(0)) and decode_threads("cuda") == 1
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has none
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert decode_threads("cpu") == 6


def test_a_cache_built_by_threads_is_the_same_file(tmp_path):
    paths = make_images(tmp_path / "img", n=150)  # 3 chunks of 64
    one = cached_images(paths, 12, sources.decode_images, tmp_path / "one", threads=1)
    three = cached_images(paths, 12, sources.decode_images, tmp_path / "three", threads=3)
    files = [next((tmp_path / d).glob("*.u8")).read_bytes() for d in ("one", "three")]
    assert files[0] == files[1] and torch.equal(one, three)


def test_without_the_cache_the_list_is_decoded_chunk_by_chunk_into_memory(tmp_path, capsys):
    """data.cache=false: the same pixels, chunk by chunk (never the whole list's full-size images at once),
    with progress lines, and a one-line error for an undecodable image."""
    paths = make_images(tmp_path / "img", n=150)
    sizes = []

    def decode(chunk, size, device):
        sizes.append(len(chunk))
        return sources.decode_images(chunk, size, device)

    quick = decoded_images(paths, 12, decode, threads=2, label="150 images")  # under 2 s: no progress lines
    assert "decoding" not in capsys.readouterr().err
    sizes.clear()
    images = decoded_images(paths, 12, decode, threads=2, label="150 images", quiet_seconds=0)
    assert torch.equal(images, quick)
    assert sizes == [64, 64, 22] and torch.equal(images, cached_images(paths, 12, decode, tmp_path / "c", threads=1))
    assert "decoding 150 images 150/150 (100%" in capsys.readouterr().err
    (tmp_path / "img" / "c0" / "0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(FedLTError, match=r"cannot decode image .*0\.jpg"):
        decoded_images(paths, 12, sources.decode_images, threads=2)


def test_a_changed_image_list_or_size_builds_a_new_file(tmp_path):
    paths = make_images(tmp_path / "img")
    decode = CountingDecoder()
    a = cached_images(paths, 12, decode, tmp_path / "cache")
    cached_images(paths[:-1], 12, decode, tmp_path / "cache")  # another list
    cached_images(paths, 8, decode, tmp_path / "cache")  # another size
    assert decode.images == 3 * len(paths) - 1
    # an image replaced in place (same path): its size and mtime change the key
    img = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    Path(paths[0]).write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
    os.utime(paths[0], ns=(1, 1))
    b = cached_images(paths, 12, decode, tmp_path / "cache")
    assert decode.images == 4 * len(paths) - 1
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1:], b[1:])


def _build_in_child(args):
    paths, folder = args
    decode = CountingDecoder()
    images = cached_images(paths, 12, decode, folder)
    return decode.images, int(images.sum())


def test_two_processes_build_it_once(tmp_path):
    paths = make_images(tmp_path / "img", n=40)
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build_in_child, [(paths, str(tmp_path / "cache"))] * 2)
    assert sorted(n for n, _ in results) == [0, 40]  # one decoded everything, the other waited and mapped
    assert results[0][1] == results[1][1]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1 and not list((tmp_path / "cache").glob("*.partial"))


def test_an_experiment_reads_the_same_images_through_the_cache(tmp_path):
    make_images(tmp_path / "img", n=30, classes=3)
    base = ["data.name=file_list", f"data.root={tmp_path / 'img'}", "data.image_size=12", "data.profile=none",
            "partition.num_clients=2", "model.name=small_cnn"]
    cached = build_experiment(load_config(None, [*base, f"data.cache_dir={tmp_path / 'cache'}"]))
    plain = build_experiment(load_config(None, [*base, "data.cache=false"]))
    assert torch.equal(cached.train.images, plain.train.images) and torch.equal(cached.test.images, plain.test.images)
    np.testing.assert_array_equal(cached.train.labels, plain.train.labels)
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2  # train and test
    assert torch.equal(cached.client_data(1).images, plain.client_data(1).images)


def test_the_run_fingerprint_of_cached_data_comes_from_the_digests_taken_when_the_file_was_built(tmp_path,
                                                                                                    monkeypatch):
    """The cache file's .json records the SHA-256 of each DIGEST_PIECE bytes as the file is built; a run's data
    fingerprint of a split mapped from it uses them instead of reading the images again (ImageNet-LT: 25 GB at every
    run start), and is the fingerprint of the same images decoded into memory. A .json without them (an earlier
    fedlt, or edited) is hashed as before, to the same fingerprint."""
    import json

    from fedlt import run_loop
    from fedlt.data import image_cache

    monkeypatch.setattr(image_cache, "DIGEST_PIECE", 1000)  # 3×12×12 = 432 bytes an image: 13 pieces
    make_images(tmp_path / "img", n=30, classes=3)
    base = ["data.name=file_list", f"data.root={tmp_path / 'img'}", "data.image_size=12", "data.profile=none",
            "partition.num_clients=2", "model.name=small_cnn"]
    plain = run_loop.data_fingerprint(build_experiment(load_config(None, [*base, "data.cache=false"])))
    cfg = load_config(None, [*base, f"data.cache_dir={tmp_path / 'cache'}"])
    cached = build_experiment(cfg)
    assert cached.train.piece_digests == image_cache.piece_digests(cached.train.images)
    assert len(cached.train.piece_digests) == -(-30 * 432 // 1000) and cached.test.piece_digests is not None
    with monkeypatch.context() as m:
        m.setattr(run_loop, "piece_digests", lambda images: pytest.fail("the cached images were hashed again"))
        assert run_loop.data_fingerprint(cached) == plain
    assert cached.train.subset(np.arange(5)).piece_digests is None  # other images: their own digests
    for record in (tmp_path / "cache").glob("*.json"):
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                      if k != "piece_sha256"}))
    again = build_experiment(cfg)
    assert again.train.piece_digests is None and run_loop.data_fingerprint(again) == plain


def test_an_edited_list_file_is_read_again_in_the_same_process(tmp_path):
    """experiment_for keeps one experiment per config in a process; a list file edited in between (a notebook)
    gives the new list's experiment, not the kept one."""
    make_images(tmp_path / "img", n=30, classes=3)
    cfg = load_config(None, ["data.name=file_list", f"data.root={tmp_path / 'img'}", "data.image_size=12",
                             "data.profile=none", "partition.num_clients=2", "model.name=small_cnn",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    first = experiment_for(cfg)
    assert experiment_for(cfg) is first and len(first.train) == 30
    train = tmp_path / "img" / "train.txt"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:20]))
    edited = experiment_for(cfg)
    assert len(edited.train) == 20 and edited.train_counts.tolist() == [7, 7, 6]


def test_bad_input_is_a_one_line_error(tmp_path):
    make_images(tmp_path / "img")
    if not torch.cuda.is_available():
        with pytest.raises(FedLTError, match="data.decode_device=cuda, but this machine has no CUDA device"):
            sources.load_file_list(str(tmp_path / "img"), "train.txt", "test.txt", 12, decode_device="cuda")
    (tmp_path / "img" / "c0" / "0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = [str(p) for p in sorted((tmp_path / "img").rglob("*.jpg"))]
    with pytest.raises(FedLTError, match=r"cannot decode image .*0\.jpg"):
        cached_images(paths, 12, sources.decode_images, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.u8"))  # nothing that looks finished
    assert not list((tmp_path / "cache").glob("*.partial"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FedLTError, match="image cache .*a-file.*set data.cache_dir to a writable folder"):
        build_experiment(load_config(None, ["data.name=file_list", f"data.root={tmp_path / 'img'}", "data.image_size=12",
                                            "data.profile=none", f"data.cache_dir={tmp_path / 'a-file'}"]))


def test_shards_stay_resident_while_they_fit_the_budget(tmp_path, monkeypatch):
    import fedlt.experiment as E

    make_images(tmp_path / "img", n=30, classes=3)
    exp = build_experiment(load_config(None, ["data.name=file_list", f"data.root={tmp_path / 'img'}",
                                              "data.image_size=12", "data.profile=none", "partition.method=iid",
                                              "partition.num_clients=3", f"data.cache_dir={tmp_path / 'cache'}"]))
    assert exp.client_data(0) is not exp.client_data(0)  # on the CPU: indexed out of the mapped set each time
    shard = 10 * 3 * 12 * 12  # bytes of one client's images (30 images, 3 IID clients)
    monkeypatch.setattr(E, "resident_budget", lambda device: shard + shard // 2)
    first = exp.client_data(0)
    assert exp.client_data(0) is first  # kept across rounds
    assert exp.client_data(1) is not exp.client_data(1)  # a second shard would exceed the budget
    assert torch.equal(first.images, exp.tensor_data("train", exp.parts[0]).images)
