"""Source data sets: Fashion-MNIST (IDX), CIFAR-10/100 (torchvision python layout), image-root + file list.

Every loader returns a :class:`Split` per split ("train", "test"): labels as a numpy array and
images either already decoded (uint8, N×C×H×W) or as paths decoded on demand. Nothing is
downloaded: a missing file is a :class:`~fedlt.errors.FedLTError` that names the path looked in
and how to get the data.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fedlt.errors import FedLTError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
JPEG_MAGIC = b"\xff\xd8\xff"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR_IMAGE_VALUES = 3 * 32 * 32  # one row of a CIFAR batch's ``data``
MAX_OPEN_CLASSES = 100_000  # a file list without a known class count: labels above this are a broken list
LABEL = re.compile(r"-?[0-9]+")  # a file list's label: ASCII digits (int() would also take '²' or '３')


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
    cache: bool = False  # materialize through the on-disk image cache (fedlt.data.image_cache)
    cache_dir: str | None = None  # None: image_cache.default_cache_dir()
    decode_device: str = "cpu"  # where JPEGs are decoded (cuda: on the GPU)
    # SHA-256 of each image_cache.DIGEST_PIECE bytes of ``images``, where the image cache recorded them (None: the
    # run's data fingerprint hashes the images); a subset holds other images, so it has none
    piece_digests: tuple[bytes, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            labels=self.labels[indices],
            num_classes=self.num_classes,
            images=None if self.images is None else self.images.index_select(0, torch.from_numpy(indices)),
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            image_size=self.image_size,
            class_names=self.class_names,
            cache=self.cache,
            cache_dir=self.cache_dir,
            decode_device=self.decode_device,
        )

    def materialize(self) -> "Split":
        """Decode a file-list split (uint8, resized to ``image_size``): into memory, or (``cache``) into the
        on-disk image cache that every process maps read-only (:mod:`fedlt.data.image_cache`)."""
        if self.images is not None:
            return self
        assert self.paths is not None
        if not self.cache:
            from fedlt.data.image_cache import decoded_images

            images = decoded_images(self.paths, self.image_size, decode_images, self.decode_device,
                                    label=f"{len(self.paths):,} images")
            return replace(self, images=images)
        from fedlt.data.image_cache import load_cached

        try:
            cached = load_cached(self.paths, self.image_size, decode_images, self.cache_dir, self.decode_device,
                                 label=f"{len(self.paths):,} images")
        except OSError as exc:
            raise FedLTError(f"image cache {self.cache_dir or 'folder'}: {exc.strerror or exc}; set data.cache_dir "
                             f"to a writable folder, or data.cache=false") from None
        return replace(self, images=cached.images, piece_digests=cached.piece_digests)

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
def _read_idx(path: Path, dims: int, what: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 08 NDIM, NDIM big-endian sizes, uint8 data; it must
    hold ``dims`` dimensions (``what`` says which, for the error)."""
    data = _idx_bytes(path)
    shape, start = _idx_header(path, data)
    expected, found = math.prod(shape), len(data) - start
    if found != expected:  # math.prod: exact, where np.prod of four-byte sizes could overflow int64
        cut = "truncated" if found < expected else "trailing bytes"
        raise FedLTError(f"malformed IDX file {path}: {cut}: its header declares {shape}, {expected} values, found "
                         f"{found}; use the IDX files of Fashion-MNIST as published")
    if len(shape) != dims:
        raise FedLTError(f"malformed IDX file {path}: {len(shape)}-D {shape}, expected {dims}-D ({what}); use the "
                         f"IDX files of Fashion-MNIST as published")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def _idx_bytes(path: Path) -> bytes:
    """The (decompressed) bytes of an IDX file; a truncated or corrupt .gz is a :class:`FedLTError`."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise FedLTError(f"malformed IDX file {path}: {exc}") from None


def _idx_header(path: Path, data: bytes) -> tuple[tuple[int, ...], int]:
    """The shape an IDX file's header declares and the offset of its data. Checked here, before any slicing, so
    that a short or foreign file is a one-line error that says what is wrong rather than a numpy traceback."""
    def bad(what: str) -> FedLTError:
        return FedLTError(f"malformed IDX file {path}: {what}; use the IDX files of Fashion-MNIST as published")

    if len(data) < 4:
        raise bad(f"truncated: {len(data)} bytes, shorter than the 4-byte magic number")
    if data[:2] != b"\x00\x00":
        raise bad(f"bad magic number {data[:4].hex(' ')}, expected 00 00 08 <ndim>")
    if data[2] != 0x08:
        raise bad(f"data type {data[2]:#04x}, expected 0x08 (unsigned bytes)")
    ndim = data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise bad(f"truncated header: {len(data)} bytes, {ndim} dimensions need {start} (4 + 4 per dimension)")
    return tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)), start


def _check_not_empty(n: int, path: Path | str, split: str) -> None:
    if n == 0:
        raise FedLTError(f"empty {split} split in {path}: it holds 0 images; the data set needs a {split} split "
                         f"with at least one image")


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
        image_file = _find(root_path, f"{prefix}-images-idx3-ubyte")
        images = _read_idx(image_file, 3, "images × rows × columns")
        label_file = _find(root_path, f"{prefix}-labels-idx1-ubyte")
        labels = _read_idx(label_file, 1, "one label per image").astype(np.int64)
        check_labels(labels, 10, str(label_file))
        if len(images) != len(labels):
            raise FedLTError(f"malformed Fashion-MNIST at {root_path}: {len(images)} images but {len(labels)} labels")
        if images.shape[1:] != (28, 28):
            raise FedLTError(f"malformed Fashion-MNIST: {image_file} holds {images.shape[1]}×{images.shape[2]} "
                             f"images, not 28×28; use the IDX files of Fashion-MNIST as published")
        _check_not_empty(len(images), image_file, split)
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
        batch_images, batch_labels = _cifar_batch(path, entry, label_key)
        check_labels(batch_labels, num_classes, str(path))
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _cifar_batch(path: Path, entry: object, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 3, 32, 32) and labels (N,) of one unpickled CIFAR batch, else a :class:`FedLTError`."""
    def bad(what: str) -> FedLTError:
        return FedLTError(f"malformed CIFAR batch {path}: {what}; use the python version of CIFAR as published")

    if not isinstance(entry, dict):
        raise bad(f"holds a {type(entry).__name__}, expected a dict with keys 'data' and {label_key!r}")
    for key in ("data", label_key):
        if key not in entry:
            raise bad(f"no {key!r} key (keys: {', '.join(map(str, entry)) or 'none'})")
    images = _as_array(entry["data"], np.uint8, "data", bad)
    labels = _as_array(entry[label_key], np.int64, label_key, bad)
    if images.size % CIFAR_IMAGE_VALUES:
        raise bad(f"'data' holds {images.size} values, not a multiple of {CIFAR_IMAGE_VALUES} (3×32×32 per image)")
    images = images.reshape(-1, 3, 32, 32)
    if labels.ndim != 1 or len(labels) != len(images):
        raise bad(f"{len(images)} images but {labels.size} labels in {label_key!r}")
    return images, labels


def _as_array(values: object, dtype: type, key: str, bad: Callable[[str], FedLTError]) -> np.ndarray:
    try:
        return np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise bad(f"{key!r} is not an array of {np.dtype(dtype).name}") from None


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
        _check_not_empty(len(images), folder / files[0] if len(files) == 1 else folder, split)
        out[split] = Split(labels, num_classes, torch.from_numpy(images), class_names=names)
    return out


# --------------------------------------------------------------------------- file lists
def read_file_list(root: str | Path, list_file: str | Path,
                   num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Read a ``relative/path label`` list (ImageNet-LT, Places-LT, iNaturalist-2018 format); every label in
    0..num_classes−1 (``None``: the data set's classes are the labels found, each in
    0..MAX_OPEN_CLASSES−1)."""
    root, list_file = Path(root), Path(list_file)
    if not list_file.is_absolute():
        list_file = root / list_file
    if not list_file.is_file():
        raise _missing(list_file, "the list file must hold one 'relative/path label' line per image")
    paths, labels = [], []
    for lineno, line in enumerate(_read_text(list_file).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not LABEL.fullmatch(parts[1]):
            raise FedLTError(f"malformed list file {list_file}:{lineno}: expected 'relative/path label', got {line!r}")
        label = int(parts[1])
        _check_list_label(label, num_classes, f"{list_file}:{lineno}")
        paths.append(str(root / parts[0]))
        labels.append(label)
    if not paths:
        raise FedLTError(f"malformed list file {list_file}: no entries")
    return paths, np.asarray(labels, dtype=np.int64)


def _read_text(list_file: Path) -> str:
    """A list file's text (UTF-8, an optional byte-order mark), else a :class:`FedLTError` naming the line."""
    data = list_file.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise FedLTError(f"malformed list file {list_file}:{lineno}: not UTF-8 text (byte {data[exc.start]:#04x}); "
                         f"save the list as UTF-8") from None


def _check_list_label(label: int, num_classes: int | None, where: str) -> None:
    """A list file's label in 0..num_classes−1; with no class count, below :data:`MAX_OPEN_CLASSES`."""
    limit = num_classes if num_classes is not None else MAX_OPEN_CLASSES
    if 0 <= label < limit:
        return
    if num_classes is not None:
        rule = f"the data set has {num_classes} classes, labels 0..{num_classes - 1}"
    elif label < 0:
        rule = "a label must be >= 0"
    else:
        rule = f"a file list holds at most {MAX_OPEN_CLASSES:,} classes, labels 0..{MAX_OPEN_CLASSES - 1}"
    raise FedLTError(f"label {label} out of range in list file {where}: {rule}")


def _read_bytes(path: str) -> torch.Tensor:
    from torchvision.io import read_file

    if not os.path.isfile(path):
        raise _missing(path, "an image named in the list file is missing under the image root")
    if os.path.getsize(path) == 0:
        raise FedLTError(f"cannot decode image {path}: the file is empty (0 bytes); replace it or drop its line "
                         f"from the list file")
    return read_file(path)


def _decode_one(path: str, data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedLTError(f"cannot decode image {path}: {reason}") from None


def decode_images(paths: list[str], size: int | None, device: str = "cpu") -> torch.Tensor:
    """Decode image files to one uint8 tensor (N, 3, size, size) on the CPU; resize (shorter side, centre crop)
    where needed. JPEGs are decoded as one batch by ``torchvision.io.decode_jpeg`` on ``device`` (``cuda``:
    nvJPEG); other formats, or a batch the decoder refuses, one by one on the CPU (naming a file it cannot read)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    raw = [_read_bytes(p) for p in paths]
    decoded: list[torch.Tensor] | None = None
    if raw and all(bytes(r[:3].tolist()) == JPEG_MAGIC for r in raw):
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = None  # a corrupt file: the one-by-one decoder below names it
    if decoded is None:
        decoded = [_decode_one(p, r) for p, r in zip(paths, raw)]
    out = None
    for i, img in enumerate(decoded):
        if size is not None and (img.shape[1] != size or img.shape[2] != size):
            img = F.center_crop(F.resize(img, size, antialias=True), [size, size])
        if out is None:
            out = torch.empty((len(paths), *img.shape), dtype=torch.uint8)
        if img.shape != out.shape[1:]:
            raise FedLTError(f"image {paths[i]} is {tuple(img.shape)}, the first one {tuple(out.shape[1:])}: "
                             f"set data.image_size to resize them to one size")
        out[i] = img.cpu()
    assert out is not None
    return out


def load_file_list(root: str | None, train_list: str, test_list: str, image_size: int | None = None,
                   num_classes: int | None = None, cache: bool = False, cache_dir: str | None = None,
                   decode_device: str = "cpu") -> dict[str, Split]:
    """Image root + ``train_list`` / ``test_list``; images are decoded only for the samples kept (through the
    on-disk cache where ``cache``)."""
    if root is None:
        raise FedLTError("data.root is not set: point it at the image root that the list files are relative to")
    if not Path(root).is_dir():
        raise _missing(root, "data.root must be the image root that the list files are relative to")
    if decode_device == "cuda" and not torch.cuda.is_available():
        raise FedLTError("data.decode_device=cuda, but this machine has no CUDA device: use data.decode_device=cpu")
    train_file, test_file = (Path(root) / lst for lst in (train_list, test_list))  # an absolute list stays as it is
    if train_file.is_file() and test_file.is_file() and train_file.samefile(test_file):
        raise FedLTError(f"data.train_list and data.test_list are the same file {train_file}: the test set would be "
                         f"the training set; point data.test_list at the held-out list")
    splits = {s: read_file_list(root, lst, num_classes) for s, lst in (("train", train_list), ("test", test_list))}
    _check_held_out(splits["train"][0], splits["test"][0], train_file, test_file)
    c = num_classes or int(max(lab.max() for _, lab in splits.values())) + 1
    names = CIFAR10_CLASSES if c == 10 and "cifar" in str(root).lower() else ()
    return {s: Split(lab, c, paths=p, image_size=image_size, class_names=names, cache=cache, cache_dir=cache_dir,
                     decode_device=decode_device) for s, (p, lab) in splits.items()}


def _check_held_out(train_paths: list[str], test_paths: list[str], train_file: Path, test_file: Path) -> None:
    """Refuse a test list that names images of the training list: the scores would be on seen data, a silently
    wrong result. Paths are compared normalised (absolute, ``.`` / ``..`` / ``//`` folded) as strings, so an
    ImageNet-LT-sized pair costs two set builds and no file system call; a symlinked alias is not caught."""
    cwd = os.getcwd()
    seen = {os.path.normpath(os.path.join(cwd, p)) for p in train_paths}
    repeated: dict[str, str] = {}  # normalised path -> the test list's first spelling of it, in list order
    for p in test_paths:
        key = os.path.normpath(os.path.join(cwd, p))
        if key in seen:
            repeated.setdefault(key, p)
    if repeated:
        raise FedLTError(f"data.test_list {test_file} repeats {len(repeated):,} of the {len(seen):,} images of "
                         f"data.train_list {train_file} (e.g. {next(iter(repeated.values()))}): the test set must be "
                         f"held out from training; point data.test_list at the held-out list or drop those lines")


# --------------------------------------------------------------------------- registry
def load_source(name: str, root: str | None = None, **options) -> dict[str, Split]:
    """Load a data set by registry name (see ``fedlt.registry.DATASETS``); ``options`` are the data set's own
    keys (a file list's ``train_list``, ``image_size``, ``cache`` …)."""
    from fedlt.registry import DATASETS

    spec = DATASETS.get(name)
    return spec(root=root, **options)
