"""Source data sets: Fashion-MNIST (IDX), CIFAR-10/100 (torchvision python layout), image-root + file list.

Every loader returns a :class:`Split` per split ("train", "test"): labels as a numpy array and
images either already decoded (uint8, N×C×H×W) or as paths decoded on demand. Nothing is
downloaded: a missing file is a :class:`~fedlt.errors.FedLTError` that names the path looked in
and how to get the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedlt.errors import FedLTError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass
class Split:
    """One split of a data set.

    ``images`` is a uint8 tensor (N, C, H, W) when the split is held in memory; for a file-list
    split it is None until :meth:`materialize` decodes the chosen ``paths``.
    """

    labels: np.ndarray
    num_classes: int
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    image_size: int | None = None
    class_names: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            labels=self.labels[indices],
            num_classes=self.num_classes,
            images=None if self.images is None else self.images[torch.from_numpy(indices)],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            image_size=self.image_size,
            class_names=self.class_names,
        )

    def materialize(self) -> "Split":
        """Decode a file-list split into memory (uint8, resized to ``image_size``)."""
        if self.images is not None:
            return self
        assert self.paths is not None
        images = decode_images(self.paths, self.image_size)
        return Split(self.labels, self.num_classes, images, self.paths, self.image_size, self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def _missing(path: Path | str, how: str) -> FedLTError:
    return FedLTError(f"data set not found at {path}: {how}")


def check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    """Every label in 0..num_classes−1 (``None``: only ≥ 0), else a :class:`FedLTError` naming ``where``."""
    bad = np.flatnonzero((labels < 0) | (labels >= (num_classes if num_classes is not None else np.inf)))
    if bad.size:
        rule = "a label must be >= 0" if num_classes is None else f"labels must be in 0..{num_classes - 1}"
        raise FedLTError(f"label {int(labels[bad[0]])} out of range in {where} (entry {int(bad[0])}): {rule}")


# --------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 08 NDIM, NDIM big-endian sizes, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz
        raise FedLTError(f"malformed IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise FedLTError(f"malformed IDX file {path}: bad magic number")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise FedLTError(f"malformed IDX file {path}: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise _missing(root / stem, "install Debian's package dataset-fashion-mnist "
                   "(apt-get install dataset-fashion-mnist) or set data.root to a folder with the IDX files")


def load_fashion_mnist(root: str | None = None) -> dict[str, Split]:
    """Fashion-MNIST (Xiao et al., 2017) from its four IDX files, 28×28 grayscale, 10 classes."""
    root_path = Path(root or FASHION_MNIST_ROOT)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(root_path, f"{prefix}-images-idx3-ubyte"))
        label_file = _find(root_path, f"{prefix}-labels-idx1-ubyte")
        labels = _read_idx(label_file).astype(np.int64)
        check_labels(labels, 10, str(label_file))
        if len(images) != len(labels):
            raise FedLTError(f"malformed Fashion-MNIST at {root_path}: {len(images)} images but {len(labels)} labels")
        splits[split] = Split(labels, 10, torch.from_numpy(images.copy()).unsqueeze(1), class_names=FASHION_MNIST_CLASSES)
    return splits


# --------------------------------------------------------------------------- CIFAR
def _load_cifar_pickles(folder: Path, files: list[str], label_key: str,
                        num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of CIFAR's python batches. They are pickles: unpickling runs whatever code the
    file names, so read them only from a trusted source (README)."""
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise _missing(path, "put the python version of CIFAR (torchvision layout) there and set data.root "
                           "to the folder that holds it")
        with open(path, "rb") as f:
            try:
                entry = pickle.load(f, encoding="latin1")
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
                raise FedLTError(f"malformed CIFAR batch {path}: {exc}") from None
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
        check_labels(labels[-1], num_classes, str(path))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(root: str | None, num_classes: int) -> dict[str, Split]:
    """CIFAR-10 / CIFAR-100 from ``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``."""
    if root is None:
        raise FedLTError(f"data.root is not set: point it at the folder holding cifar-{num_classes}-"
                         f"{'batches-py' if num_classes == 10 else 'python'} (no download step)")
    if num_classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        train = [f"data_batch_{i}" for i in range(1, 6)]
        test, key = ["test_batch"], "labels"
    else:
        folder = Path(root) / "cifar-100-python"
        train, test, key = ["train"], ["test"], "fine_labels"
    names = CIFAR10_CLASSES if num_classes == 10 else ()
    out = {}
    for split, files in (("train", train), ("test", test)):
        images, labels = _load_cifar_pickles(folder, files, key, num_classes)
        out[split] = Split(labels, num_classes, torch.from_numpy(images), class_names=names)
    return out


# --------------------------------------------------------------------------- file lists
def read_file_list(root: str | Path, list_file: str | Path,
                   num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Read a ``relative/path label`` list (ImageNet-LT, Places-LT, iNaturalist-2018 format); every label in
    0..num_classes−1 (``None``: the data set's classes are the labels found, each ≥ 0)."""
    root, list_file = Path(root), Path(list_file)
    if not list_file.is_absolute():
        list_file = root / list_file
    if not list_file.is_file():
        raise _missing(list_file, "the list file must hold one 'relative/path label' line per image")
    paths, labels = [], []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise FedLTError(f"malformed list file {list_file}:{lineno}: expected 'relative/path label', got {line!r}")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                rule = ("a label must be >= 0" if num_classes is None else
                        f"the data set has {num_classes} classes, labels 0..{num_classes - 1}")
                raise FedLTError(f"label {label} out of range in list file {list_file}:{lineno}: {rule}")
            paths.append(str(root / parts[0]))
            labels.append(label)
    if not paths:
        raise FedLTError(f"malformed list file {list_file}: no entries")
    return paths, np.asarray(labels, dtype=np.int64)


def decode_images(paths: list[str], size: int | None) -> torch.Tensor:
    """Decode image files to one uint8 tensor (N, 3, size, size); resize (shorter side, centre crop) if needed."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    out = None
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            raise _missing(path, "an image named in the list file is missing under the image root")
        try:
            img = decode_image(path, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FedLTError(f"cannot decode image {path}: {reason}") from None
        if size is not None and (img.shape[1] != size or img.shape[2] != size):
            img = F.center_crop(F.resize(img, size, antialias=True), [size, size])
        if out is None:
            out = torch.empty((len(paths), *img.shape), dtype=torch.uint8)
        out[i] = img
    assert out is not None
    return out


def load_file_list(root: str | None, train_list: str, test_list: str, image_size: int | None = None,
                   num_classes: int | None = None) -> dict[str, Split]:
    """Image root + ``train_list`` / ``test_list``; images are decoded only for the samples kept."""
    if root is None:
        raise FedLTError("data.root is not set: point it at the image root that the list files are relative to")
    if not Path(root).is_dir():
        raise _missing(root, "data.root must be the image root that the list files are relative to")
    splits = {s: read_file_list(root, lst, num_classes) for s, lst in (("train", train_list), ("test", test_list))}
    c = num_classes or int(max(lab.max() for _, lab in splits.values())) + 1
    names = CIFAR10_CLASSES if c == 10 and "cifar" in str(root).lower() else ()
    return {s: Split(lab, c, paths=p, image_size=image_size, class_names=names) for s, (p, lab) in splits.items()}


# --------------------------------------------------------------------------- registry
def load_source(name: str, root: str | None = None, train_list: str = "train.txt", test_list: str = "test.txt",
                image_size: int | None = None) -> dict[str, Split]:
    """Load a data set by registry name (see ``fedlt.registry.DATASETS``)."""
    from fedlt.registry import DATASETS

    spec = DATASETS.get(name)
    return spec(root=root, train_list=train_list, test_list=test_list, image_size=image_size)
