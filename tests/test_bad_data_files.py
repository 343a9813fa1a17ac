"""Broken data files: each is one ``error: ...`` line naming the file and what is wrong, before training, never a
traceback or a finished-looking run (tiny files generated under tmp_path)."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from conftest import ROOT
from fedlt.data.sources import load_cifar, load_fashion_mnist, read_file_list
from fedlt.errors import FedLTError
from fedlt.simulate import main

DEFAULT = str(ROOT / "configs/default.yaml")
TINY = ["data.profile=none", "train.batch_size=8", "partition.method=iid", "partition.num_clients=2",
        "federation.rounds=1", "federation.engine=inprocess", "mode=federated", "model.name=small_cnn"]


def refused(capsys, tmp_path, *args: str) -> str:
    """Run the CLI; assert exit status 2, one line on stderr, no traceback, no summary.json; return the message."""
    code = main(["--config", DEFAULT, "--out", str(tmp_path / "runs"), *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("summary.json"))
    return err.strip().removeprefix("error: ")


# ------------------------------------------------------------------------------------------ CIFAR batches
def write_cifar(root, entry_of):
    """A CIFAR-10 python folder whose every batch is ``entry_of(name)``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(entry_of(name), f)
    return folder


@pytest.mark.parametrize("entry,message", [
    ({"labels": [1, 2]}, "no 'data' key (keys: labels)"),
    ([1, 2, 3], "holds a list, expected a dict with keys 'data' and 'labels'"),
    ({"data": np.zeros((4, 100), np.uint8), "labels": [1, 2, 3, 4]},
     "'data' holds 400 values, not a multiple of 3072 (3×32×32 per image)"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [1, 2]}, "4 images but 2 labels in 'labels'"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": ["a", "b", "c", "d"]}, "'labels' is not an array of int64"),
], ids=["no-data-key", "a-list", "wrong-size", "fewer-labels", "string-labels"])
def test_malformed_cifar_batch_names_the_batch(tmp_path, entry, message):
    folder = write_cifar(tmp_path, lambda name: entry)
    with pytest.raises(FedLTError) as e:
        load_cifar(str(tmp_path), 10)
    assert str(e.value) == (f"malformed CIFAR batch {folder / 'data_batch_1'}: {message}; use the python version of "
                            f"CIFAR as published")


def test_cifar_with_fewer_labels_stops_before_training(capsys, tmp_path):
    """It used to train and crash at evaluation with a numpy broadcast error."""
    folder = write_cifar(tmp_path, lambda name: {"data": np.zeros((4, 3072), np.uint8),
                                                 "labels": [1, 2] if name == "test_batch" else [1, 2, 3, 4]})
    line = refused(capsys, tmp_path, "data.name=cifar10", f"data.root={tmp_path}")
    assert line.startswith(f"malformed CIFAR batch {folder / 'test_batch'}: 4 images but 2 labels")


def test_empty_cifar_test_batch_is_refused(tmp_path):
    folder = write_cifar(tmp_path, lambda name: {"data": np.zeros((0 if name == "test_batch" else 4, 3072), np.uint8),
                                                 "labels": [] if name == "test_batch" else [1, 2, 3, 4]})
    with pytest.raises(FedLTError, match=rf"^empty test split in {folder / 'test_batch'}: it holds 0 images"):
        load_cifar(str(tmp_path), 10)


# ------------------------------------------------------------------------------------------ IDX files
def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fashion(root, train_images=None, train_labels=None, test_images=None, test_labels=None):
    rng = np.random.default_rng(0)
    arrays = {"train-images": train_images, "train-labels": train_labels,
              "t10k-images": test_images, "t10k-labels": test_labels}
    for prefix, n in (("train", 20), ("t10k", 10)):
        images, labels = arrays[f"{prefix}-images"], arrays[f"{prefix}-labels"]
        images = rng.integers(0, 255, (n, 28, 28)) if images is None else images
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10 if labels is None else labels)


def test_idx_labels_of_two_dimensions(tmp_path):
    write_fashion(tmp_path, train_labels=(np.arange(40) % 10).reshape(20, 2))
    with pytest.raises(FedLTError) as e:
        load_fashion_mnist(str(tmp_path))
    assert str(e.value).startswith(f"malformed IDX file {tmp_path / 'train-labels-idx1-ubyte.gz'}: 2-D (20, 2), "
                                   f"expected 1-D (one label per image)")


def test_flat_idx_images_stop_before_training(capsys, tmp_path):
    """N×784 images used to reach a conv2d crash in training."""
    write_fashion(tmp_path, train_images=np.zeros((20, 784)))
    line = refused(capsys, tmp_path, f"data.root={tmp_path}")
    assert line.startswith(f"malformed IDX file {tmp_path / 'train-images-idx3-ubyte.gz'}: 2-D (20, 784), "
                           f"expected 3-D (images × rows × columns)")


def test_idx_images_that_are_not_28_by_28(capsys, tmp_path):
    """32×32 test images used to be evaluated on a model trained on 28×28 ones (small_cnn pools them adaptively)."""
    write_fashion(tmp_path, test_images=np.zeros((10, 32, 32)))
    line = refused(capsys, tmp_path, f"data.root={tmp_path}")
    assert line == (f"malformed Fashion-MNIST: {tmp_path / 't10k-images-idx3-ubyte.gz'} holds 32×32 images, not "
                    f"28×28; use the IDX files of Fashion-MNIST as published")


@pytest.mark.parametrize("split,prefix", [("test", "t10k"), ("train", "train")])
def test_empty_idx_split_is_refused(capsys, tmp_path, split, prefix):
    """An empty test split used to finish with accuracy null in summary.json."""
    empty = {f"{split}_images": np.zeros((0, 28, 28)), f"{split}_labels": np.zeros((0,))}
    write_fashion(tmp_path, **empty)
    line = refused(capsys, tmp_path, f"data.root={tmp_path}")
    assert line == (f"empty {split} split in {tmp_path / f'{prefix}-images-idx3-ubyte.gz'}: it holds 0 images; the "
                    f"data set needs a {split} split with at least one image")


def test_empty_split_of_any_data_set_is_refused(monkeypatch):
    """A plug-in data set's loader has no check of its own: build_experiment refuses its empty split."""
    import fedlt.experiment as experiment
    from fedlt.config import load_config
    from fedlt.data.sources import Split

    split = Split(np.zeros(4, dtype=np.int64), 10, torch.zeros((4, 1, 28, 28), dtype=torch.uint8))
    monkeypatch.setattr(experiment, "load_source", lambda name, **_: {"train": split, "test": split.subset([])})
    with pytest.raises(FedLTError, match="^data set fashion_mnist at its default place has an empty test split"):
        experiment.build_experiment(load_config(None, ["data.profile=none"]))


# ------------------------------------------------------------------------------------------ file lists
def write_list(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def test_list_file_that_is_not_utf8(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"a.png 0\n\xff\xfeb.png 1\n")
    with pytest.raises(FedLTError) as e:
        read_file_list(tmp_path, "train.txt")
    assert str(e.value) == f"malformed list file {tmp_path / 'train.txt'}:2: not UTF-8 text (byte 0xff); save the " \
                           f"list as UTF-8"


@pytest.mark.parametrize("label", ["²", "３", "--3"])
def test_list_label_that_int_would_choke_on_or_misread(tmp_path, label):
    write_list(tmp_path / "train.txt", ["a.png 0", f"b.png {label}"])
    with pytest.raises(FedLTError) as e:
        read_file_list(tmp_path, "train.txt")
    assert str(e.value) == f"malformed list file {tmp_path / 'train.txt'}:2: expected 'relative/path label', got " \
                           f"'b.png {label}'"


def test_absurd_label_of_an_open_file_list(tmp_path):
    """A file list with no known class count used to make numpy allocate 745 GiB for its class counts."""
    write_list(tmp_path / "train.txt", ["a.png 0", "b.png 99999999999"])
    with pytest.raises(FedLTError) as e:
        read_file_list(tmp_path, "train.txt")
    assert str(e.value) == (f"label 99999999999 out of range in list file {tmp_path / 'train.txt'}:2: a file list "
                            f"holds at most 100,000 classes, labels 0..99999")


def write_pngs(root, n=4, size=8):
    from torchvision.io import write_png

    (root / "test").mkdir(exist_ok=True)
    for i in range(n):
        for name in (f"{i}.png", f"test/{i}.png"):  # a held-out test copy: a test list may not repeat training images
            write_png(torch.full((3, size, size), 40 * i, dtype=torch.uint8), str(root / name))
    write_list(root / "train.txt", [f"{i}.png {i}" for i in range(n)])
    write_list(root / "test.txt", [f"test/{i}.png {i}" for i in range(n)])


def test_zero_byte_image(capsys, tmp_path):
    write_pngs(tmp_path)
    (tmp_path / "2.png").write_bytes(b"")
    line = refused(capsys, tmp_path, "data.name=cifar10_files", f"data.root={tmp_path}", "data.cache=false")
    assert line == f"cannot decode image {tmp_path / '2.png'}: the file is empty (0 bytes); replace it or drop its " \
                   f"line from the list file"


# ------------------------------------------------------------------------------------------ image size
def test_file_list_splits_of_two_image_sizes(capsys, tmp_path):
    """Without data.image_size each split kept its own size: a model trained on 8×8 images was tested on 16×16."""
    from torchvision.io import write_png

    write_pngs(tmp_path)
    for i in range(4):
        write_png(torch.full((3, 16, 16), 9, dtype=torch.uint8), str(tmp_path / f"big{i}.png"))
    write_list(tmp_path / "test.txt", [f"big{i}.png {i}" for i in range(4)])
    line = refused(capsys, tmp_path, "data.name=cifar10_files", f"data.root={tmp_path}", "data.cache=false")
    assert line == ("data set cifar10_files: the training images are 3×8×8, the test images 3×16×16; both splits "
                    "must have one size (for a file list, set data.image_size to resize them)")
    assert main(["--dry-run", "--config", DEFAULT, "--out", str(tmp_path / "runs"), *TINY, "data.name=cifar10_files",
                 f"data.root={tmp_path}", "data.cache=false", "partition.min_size=1", "data.image_size=8"]) == 0


@pytest.mark.parametrize("size", [1, 3])
def test_image_size_too_small_for_the_model(capsys, tmp_path, size):
    """It used to reach max_pool2d's 'Output size is too small' in training; 4×4, the least small_cnn takes, is
    still accepted and the model comes back in training mode."""
    from fedlt.config import load_config
    from fedlt.experiment import build_experiment, model_for

    write_pngs(tmp_path)
    line = refused(capsys, tmp_path, "data.name=cifar10_files", f"data.root={tmp_path}", f"data.image_size={size}",
                   "data.cache=false", "data.crop_padding=0")  # (a padding of the image's side is refused first)
    assert line.startswith(f"images of {size}×{size} pixels are too small for model small_cnn: ")
    assert line.endswith("Output size is too small; use larger images (a file list's data.image_size) or another "
                         "model.name")
    cfg = load_config(DEFAULT, [*TINY, "data.name=cifar10_files", f"data.root={tmp_path}", "data.image_size=4",
                                "data.cache=false"])
    exp = build_experiment(cfg)
    model = model_for(cfg, exp)
    assert model.training and model(exp.tensor_data("test").images[:2].float()).shape == (2, 10)



@pytest.mark.parametrize("test_list", ["train.txt", "./train.txt", "{root}/train.txt"])
def test_the_training_list_given_as_the_test_list_is_refused(capsys, tmp_path, test_list):
    """data.test_list=train.txt (a typo) ran to a finished run that reported accuracy on the training images."""
    write_pngs(tmp_path)
    line = refused(capsys, tmp_path, "data.name=cifar10_files", f"data.root={tmp_path}", "data.cache=false",
                   "partition.min_size=1", f"data.test_list={test_list.format(root=tmp_path)}")
    assert line == (f"data.train_list and data.test_list are the same file {tmp_path / 'train.txt'}: the test set "
                    f"would be the training set; point data.test_list at the held-out list")


def test_classes_without_training_or_test_images_are_warned_of(capsys, tmp_path):
    """A file list that leaves classes out of a split ran silently: N_max/N_min was printed against one image, a
    class without training images became a 0 % few-shot class, one without test images left the means."""
    from fedlt.config import load_config
    from fedlt.simulate import check_data

    write_pngs(tmp_path)
    write_list(tmp_path / "train.txt", [f"{i}.png {i}" for i in (0, 2, 3)])
    check_data([load_config(DEFAULT, [*TINY, "data.name=cifar10_files", f"data.root={tmp_path}", "data.cache=false",
                                      "partition.min_size=1"])])
    out = capsys.readouterr().out
    assert "(profile none: the training set as given; N_max/N_min = inf)" in out
    assert ("warning: 7 of 10 classes have no training image (class 1, 4, 5, 6, 7, … (7 in all)): no model can "
            "learn them; they count as few-shot and their test images as errors") in out
    assert ("warning: 6 of 10 classes have no test image (class 4, 5, 6, 7, 8, … (6 in all)): they have no "
            "accuracy; balanced accuracy and the many/medium/few means leave them out") in out
    every = tmp_path / "every"  # each class in both splits: no warning
    every.mkdir()
    write_pngs(every)
    write_list(every / "train.txt", [f"{c % 4}.png {c}" for c in range(10) for _ in range(10 - c)])
    write_list(every / "test.txt", [f"test/{c % 4}.png {c}" for c in range(10)])
    check_data([load_config(DEFAULT, [*TINY, "data.name=cifar10_files", f"data.root={every}", "data.cache=false"])])
    out = capsys.readouterr().out
    assert "N_max/N_min = 10)" in out and "warning" not in out
