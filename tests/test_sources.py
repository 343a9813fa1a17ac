import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from conftest import FASHION, SHARED, needs_fashion
from fedlt.data.sources import decode_images, load_cifar, load_fashion_mnist, load_file_list, read_file_list
from fedlt.errors import FedLTError

CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader_on_generated_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    splits = load_fashion_mnist(str(tmp_path))
    assert splits["train"].images.shape == (12, 1, 28, 28) and splits["train"].images.dtype == torch.uint8
    assert splits["test"].labels.tolist() == [0, 1, 2, 3, 4]


def test_malformed_idx_is_a_one_line_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(FedLTError, match="malformed IDX"):
        load_fashion_mnist(str(tmp_path))


def test_missing_fashion_mnist_names_path_and_package(tmp_path):
    with pytest.raises(FedLTError, match="dataset-fashion-mnist") as e:
        load_fashion_mnist(str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value) and "\n" not in str(e.value)


@needs_fashion
def test_debian_fashion_mnist():
    splits = load_fashion_mnist(str(FASHION))
    assert len(splits["train"]) == 60000 and len(splits["test"]) == 10000
    assert splits["test"].class_counts.tolist() == [1000] * 10


def write_cifar(root, num_classes):
    rng = np.random.default_rng(0)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        files, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        folder = root / "cifar-100-python"
        files, key = ["train", "test"], "fine_labels"
    folder.mkdir(parents=True)
    for name in files:
        entry = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), key: [1, 2, 3, num_classes - 1]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_python_layout(tmp_path, num_classes):
    write_cifar(tmp_path, num_classes)
    splits = load_cifar(str(tmp_path), num_classes)
    n_train = 20 if num_classes == 10 else 4
    assert splits["train"].images.shape == (n_train, 3, 32, 32)
    assert splits["test"].labels.tolist() == [1, 2, 3, num_classes - 1]


def test_missing_cifar_is_an_error(tmp_path):
    with pytest.raises(FedLTError, match="cifar-10-batches-py"):
        load_cifar(str(tmp_path), 10)
    with pytest.raises(FedLTError, match="data.root"):
        load_cifar(None, 100)


def test_file_list_reader_errors(tmp_path):
    (tmp_path / "bad.txt").write_text("a/b.jpg 1\nno-label-here\n")
    with pytest.raises(FedLTError, match="bad.txt:2"):
        read_file_list(tmp_path, "bad.txt")
    with pytest.raises(FedLTError, match="missing.txt"):
        read_file_list(tmp_path, "missing.txt")


@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason="../shared/data/cifar10-jpeg not present")
def test_file_list_opens_the_cifar10_jpeg_copy():
    splits = load_file_list(str(CIFAR_JPEG), "train.txt", "test.txt")
    train, test = splits["train"], splits["test"]
    assert len(train) == 50000 and len(test) == 10000 and train.num_classes == 10
    assert train.class_counts.tolist() == [5000] * 10 and test.class_counts.tolist() == [1000] * 10
    assert train.labels[:3].tolist() == [6, 9, 9]  # CIFAR-10's original batch order
    part = train.subset(np.arange(8)).materialize()
    assert part.images.shape == (8, 3, 32, 32) and part.images.dtype == torch.uint8
    assert train.class_names[0] == "airplane"


def test_decode_resizes_to_image_size(tmp_path):
    from torchvision.io import write_png

    img = torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8)
    write_png(img, str(tmp_path / "x.png"))
    assert decode_images([str(tmp_path / "x.png")], 16).shape == (1, 3, 16, 16)
