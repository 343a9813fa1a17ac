"""Bad data files the loaders must refuse with a one-line error: a test list that repeats training images (a
silently wrong score) and an IDX file whose header or payload is cut short (was a numpy traceback)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import ROOT
from fedlt.data.sources import load_fashion_mnist, load_file_list, load_source
from fedlt.errors import FedLTError
from fedlt.simulate import main

DEFAULT = str(ROOT / "configs/default.yaml")
LIST_DATA_SETS = ["file_list", "cifar10_files", "imagenet_lt", "places_lt", "inaturalist2018"]


def refused(capsys, tmp_path, *args: str) -> str:
    """Run the CLI on the default config; assert exit status 2 and one ``error:`` line, no traceback; return it."""
    code = main(["--config", DEFAULT, "--out", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("summary.json"))
    return err.strip()


# ------------------------------------------------------------------------------------------ file lists
def write_images(root, names):
    """Tiny 8×8 PNGs under ``root``, one per relative name."""
    from torchvision.io import write_png

    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(root / name))


def write_list(root, name, lines):
    (root / name).write_text("".join(f"{line}\n" for line in lines))


TRAIN = [f"train/{c}/{i}.png {c}" for c in range(3) for i in range(2)]  # 6 images, classes 0..2


def test_a_copy_of_the_training_list_is_refused_as_test_list(tmp_path):
    write_list(tmp_path, "train.txt", TRAIN)
    write_list(tmp_path, "test_copy.txt", TRAIN)  # byte for byte the same, another file
    with pytest.raises(FedLTError) as e:
        load_file_list(str(tmp_path), "train.txt", "test_copy.txt")
    assert str(e.value) == (f"data.test_list {tmp_path / 'test_copy.txt'} repeats 6 of the 6 images of "
                            f"data.train_list {tmp_path / 'train.txt'} (e.g. {tmp_path / 'train/0/0.png'}): the "
                            f"test set must be held out from training; point data.test_list at the held-out list "
                            f"or drop those lines")


def test_overlap_is_found_however_the_path_is_spelled(tmp_path):
    """``./a``, ``a//b``, ``x/../a`` and an absolute path name the same image as ``a``: all count."""
    write_list(tmp_path, "train.txt", TRAIN)
    write_list(tmp_path, "test.txt", ["test/0.png 0", "test/../train/2/0.png 2", "./train/0/0.png 0",
                                      "train//1/1.png 1", f"{tmp_path / 'train/2/1.png'} 2", "./train/0/0.png 0",
                                      "test/../train/0/0.png 0"])  # the same image again: counted once
    with pytest.raises(FedLTError, match=r"repeats 4 of the 6 images of data.train_list .*train.txt \(e\.g\. "
                                         r".*/test/\.\./train/2/0\.png\)"):
        load_file_list(str(tmp_path), "train.txt", "test.txt")


def test_one_shared_image_is_enough_to_refuse(tmp_path):
    write_list(tmp_path, "train.txt", TRAIN)
    write_list(tmp_path, "test.txt", [f"test/{i}.png {i % 3}" for i in range(5)] + ["train/1/1.png 1"])
    with pytest.raises(FedLTError, match=r"^data\.test_list .*test\.txt repeats 1 of the 6 images of "
                                         r"data\.train_list .*train\.txt \(e\.g\. .*train/1/1\.png\)"):
        load_file_list(str(tmp_path), "train.txt", "test.txt")


def test_held_out_lists_still_load(tmp_path):
    write_list(tmp_path, "train.txt", TRAIN)
    write_list(tmp_path, "test.txt", ["test/0.png 0", "test/1.png 2", "train_extra/0/0.png 1"])
    splits = load_file_list(str(tmp_path), "train.txt", "test.txt")
    assert (len(splits["train"]), len(splits["test"])) == (6, 3)


@pytest.mark.parametrize("name", LIST_DATA_SETS)
def test_every_list_data_set_refuses_an_overlap(tmp_path, name):
    write_list(tmp_path, "train.txt", TRAIN)
    write_list(tmp_path, "test.txt", ["test/0.png 0", "train/2/1.png 2"])
    with pytest.raises(FedLTError, match="repeats 1 of the 6 images"):
        load_source(name, root=str(tmp_path), train_list="train.txt", test_list="test.txt")


def test_cli_refuses_a_test_list_that_repeats_training_images(capsys, tmp_path):
    names = [line.split()[0] for line in TRAIN]
    write_images(tmp_path, names)
    write_list(tmp_path, "train.txt", TRAIN)
    write_list(tmp_path, "test.txt", TRAIN[:2])
    line = refused(capsys, tmp_path, "mode=centralized", "centralized.epochs=1", "data.profile=none",
                   "model.name=small_cnn", "data.name=file_list", f"data.root={tmp_path}",
                   f"data.cache_dir={tmp_path / 'cache'}")
    assert line.startswith(f"error: data.test_list {tmp_path / 'test.txt'} repeats 2 of the 6 images of "
                           f"data.train_list {tmp_path / 'train.txt'} (e.g. {tmp_path / 'train/0/0.png'})")
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded


# ------------------------------------------------------------------------------------------ IDX files
def idx_bytes(array, magic=b"\x00\x00\x08"):
    header = magic + bytes([array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(root, gz=False):
    """A valid tiny Fashion-MNIST (6 training, 3 test images) in IDX files, plain or gzipped."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        for kind, array in (("images-idx3", rng.integers(0, 255, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            write(root / f"{prefix}-{kind}-ubyte", idx_bytes(array), gz)


def write(path, data, gz):
    """Write ``data`` to ``path`` (``gz``: gzipped to ``path.gz``); return the path written."""
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


IMAGES = idx_bytes(np.zeros((6, 28, 28)))
BAD_IDX = [
    (b"\x00\x00\x08\x03", "truncated header: 4 bytes, 3 dimensions need 16 (4 + 4 per dimension)"),
    (IMAGES[:12], "truncated header: 12 bytes, 3 dimensions need 16 (4 + 4 per dimension)"),
    (b"", "truncated: 0 bytes, shorter than the 4-byte magic number"),
    (b"\x00\x00", "truncated: 2 bytes, shorter than the 4-byte magic number"),
    (IMAGES[:100], "truncated: its header declares (6, 28, 28), 4704 values, found 84"),
    (IMAGES + b"\x00" * 5, "trailing bytes: its header declares (6, 28, 28), 4704 values, found 4709"),
    (b"\x89PNG" + IMAGES[4:], "bad magic number 89 50 4e 47, expected 00 00 08 <ndim>"),
    (b"\x00\x00\x0d" + IMAGES[3:], "data type 0x0d, expected 0x08 (unsigned bytes)"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("data,what", BAD_IDX, ids=[w.split(":")[0].split(",")[0] for _, w in BAD_IDX])
def test_bad_idx_names_the_file_and_what_is_wrong(tmp_path, data, what, gz):
    write_fashion(tmp_path, gz)
    for old in tmp_path.glob("train-images-idx3-ubyte*"):
        old.unlink()
    path = write(tmp_path / "train-images-idx3-ubyte", data, gz)
    with pytest.raises(FedLTError) as e:
        load_fashion_mnist(str(tmp_path))
    assert str(e.value) == f"malformed IDX file {path}: {what}; use the IDX files of Fashion-MNIST as published"


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_generated_idx_files_still_load(tmp_path, gz):
    write_fashion(tmp_path, gz)
    splits = load_fashion_mnist(str(tmp_path))
    assert splits["train"].images.shape == (6, 1, 28, 28) and splits["test"].labels.tolist() == [0, 1, 2]


def test_dry_run_refuses_a_four_byte_idx_header(capsys, tmp_path):
    """The audit's case: only a 4-byte train-images-idx3-ubyte (00 00 08 03) in data.root."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    line = refused(capsys, tmp_path, "--dry-run", f"data.root={tmp_path}")
    assert line == (f"error: malformed IDX file {tmp_path / 'train-images-idx3-ubyte'}: truncated header: 4 bytes, "
                    f"3 dimensions need 16 (4 + 4 per dimension); use the IDX files of Fashion-MNIST as published")
