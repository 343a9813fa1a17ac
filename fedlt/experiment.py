"""From a resolved config to the data of one experiment: long-tailed training set, balanced test set,
client partition. Deterministic in the config's seed; cached per process (every Flower client actor
rebuilds the same experiment once and keeps it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedlt.config import Config, config_from_dict
from fedlt.data import partition as P
from fedlt.data.longtail import longtail_counts, longtail_indices
from fedlt.data.sources import Split, load_source
from fedlt.errors import FedLTError
from fedlt.models import SplitModel, build_model
from fedlt.options import DataOptions
from fedlt.registry import CLIENTS, DATASETS
from fedlt.streams import Stream, seeded_rng
from fedlt.train import Augment, TensorData


@dataclass
class Experiment:
    train: Split  # long-tailed, in memory
    test: Split  # balanced, in memory
    parts: list[np.ndarray]  # client -> indices into train
    mean: torch.Tensor
    std: torch.Tensor
    in_channels: int
    _resident: dict = field(default_factory=dict, repr=False)  # (client, device) -> its shard kept on the device
    _resident_bytes: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def train_counts(self) -> np.ndarray:
        return self.train.class_counts

    def partition_counts(self) -> np.ndarray:
        return P.partition_counts(self.train.labels, self.parts, self.num_classes)

    def tensor_data(self, split: str = "train", indices: np.ndarray | None = None,
                    device: torch.device | str = "cpu") -> TensorData:
        s = self.train if split == "train" else self.test
        images, labels = s.images, torch.from_numpy(s.labels)
        if indices is not None:
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
            images, labels = images.index_select(0, idx), labels[idx]
        return TensorData(images, labels, self.mean, self.std, self.num_classes).to(torch.device(device))

    def client_data(self, client: int, device: torch.device | str = "cpu") -> TensorData:
        """Client ``client``'s shard on ``device``. On an accelerator the shard stays resident in this process
        across rounds (the next message of the client gets the same tensors, no copy) while all resident shards
        together fit in :func:`resident_budget` (a quarter of the device's memory); a shard that does not fit is
        copied on each call. On the CPU it is indexed out of the (memory-mapped) training set on each call:
        keeping copies would hold the whole training set again in every process that serves many clients."""
        device = torch.device(device)
        key = (client, str(device))
        if key in self._resident:
            return self._resident[key]
        data = self.tensor_data("train", self.parts[client], device)
        size = data.images.numel() * data.images.element_size()
        if sum(self._resident_bytes.values()) + size <= resident_budget(device):
            self._resident[key], self._resident_bytes[key] = data, size
        return data


def resident_budget(device: torch.device) -> int:
    """Bytes of client shards a process keeps on ``device`` across rounds: a quarter of a CUDA device's memory
    (the rest is for models, activations and the fused engine's stacked cohort); none on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 0


def longtail_subset(cfg: Config, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices of the long-tailed training subset of a source with these ``labels`` (all of them for
    ``data.profile=none``), drawn from the run's LONGTAIL stream."""
    data = cfg.data
    if data.profile == "none":
        return np.arange(len(labels))
    meta = DATASETS.meta[data.name] if data.name in DATASETS else {}
    n_max = meta.get("n_max") or int(np.bincount(labels, minlength=num_classes).max())
    counts = longtail_counts(n_max, num_classes, data.imbalance_factor, data.profile)
    try:
        return longtail_indices(labels, counts, seeded_rng(cfg.seed, Stream.LONGTAIL))
    except FedLTError as exc:  # the usual cause: a list that is long-tailed already (ImageNet-LT, Places-LT, iNat)
        raise FedLTError(f"{exc} (data.profile={data.profile}, data.imbalance_factor={data.imbalance_factor:g}, "
                         f"n_max={n_max}); a training set that is long-tailed already takes data.profile=none"
                         ) from None


def partition_labels(cfg: Config, labels: np.ndarray) -> list[np.ndarray]:
    """The client partition (``cfg.partition``) of a training set with these ``labels``, from the run's
    PARTITION stream: one sorted index array per client. Needs the labels only (tests partition every shipped
    config from label arrays)."""
    part, k = cfg.partition, cfg.partition.num_clients
    rng = seeded_rng(cfg.seed, Stream.PARTITION)
    if k > len(labels):
        raise FedLTError(f"partition.num_clients={k} is more than the {len(labels)} training samples")
    if part.method == "dirichlet":
        return P.dirichlet_partition(labels, k, part.alpha, rng, part.min_size, part.balance)
    if part.method == "creff_dirichlet":
        return P.creff_dirichlet_partition(labels, k, part.alpha, rng, part.min_size)
    if part.method == "multinomial_dirichlet":
        return P.multinomial_dirichlet_partition(labels, k, part.alpha, rng, part.min_size)
    if part.method == "shards":
        return P.shard_partition(labels, k, part.shards_per_client, rng)
    return P.iid_partition(labels, k, rng)


def build_experiment(cfg: Config) -> Experiment:
    """Load the source, cut the long-tailed subset, partition it across clients."""
    data = cfg.data
    meta = DATASETS.meta[data.name] if data.name in DATASETS else {}
    own = data.model_dump(exclude=set(DataOptions.model_fields) - {"root"})  # the data set's own keys
    splits = load_source(data.name, **own)
    train, test = splits["train"], splits["test"]
    for split, s in (("train", train), ("test", test)):
        if len(s) == 0:
            raise FedLTError(f"data set {data.name} at {data.root or 'its default place'} has an empty {split} split: "
                             f"it needs at least one {split} image")
    if data.profile != "none":
        train = train.subset(longtail_subset(cfg, train.labels, train.num_classes))
    train, test = train.materialize(), test.materialize()
    if train.images.shape[1:] != test.images.shape[1:]:  # a model would test on another resolution than it trained
        c, h, w = train.images.shape[1:]
        tc, th, tw = test.images.shape[1:]
        raise FedLTError(f"data set {data.name}: the training images are {c}×{h}×{w}, the test images "
                         f"{tc}×{th}×{tw}; both splits must have one size (for a file list, set data.image_size to "
                         f"resize them)")
    parts = partition_labels(cfg, train.labels)
    channels = train.images.shape[1]
    mean = torch.tensor(normalisation(data, "mean", meta.get("mean", (0.5,) * channels), channels))
    std = torch.tensor(normalisation(data, "std", meta.get("std", (0.25,) * channels), channels))
    return Experiment(train, test, parts, mean, std, channels)


def normalisation(data: DataOptions, key: str, default: tuple[float, ...], channels: int) -> list[float]:
    """``data.mean`` / ``data.std`` as given (an official recipe's constants), else the data set's ``default``;
    one value per image channel, or a one-line error."""
    given = getattr(data, key)
    if given is None:
        return [float(v) for v in default]
    if len(given) != channels:
        raise FedLTError(f"data.{key} has {len(given)} values, {data.name}'s images have {channels} channel(s): "
                         f"give one per channel")
    return [float(v) for v in given]


@lru_cache(maxsize=4)
def _cached(key: str, lists: tuple) -> Experiment:
    return build_experiment(config_from_dict(json.loads(key)))


def experiment_for(cfg: Config) -> Experiment:
    """The experiment of ``cfg``, built once per process for the same data/partition/seed and the same list
    files (a list file edited in between, e.g. in a notebook, is built again: :func:`_list_files_state`)."""
    key = json.dumps({"data": cfg.data.model_dump(mode="json"), "partition": cfg.partition.model_dump(mode="json"),
                      "seed": cfg.seed, "plugins": cfg.plugins}, sort_keys=True)
    return _cached(key, _list_files_state(cfg))


def _list_files_state(cfg: Config) -> tuple:
    """(key, byte size, mtime in ns) of each file list the data section names (its ``*_list`` keys, relative
    to ``data.root``); None for one that cannot be read (loading names it)."""
    data = cfg.data.model_dump()
    root = Path(data.get("root") or ".").expanduser()
    state = []
    for key in sorted(k for k, v in data.items() if k.endswith("_list") and isinstance(v, str)):
        try:
            st = (root / data[key]).stat()
            state.append((key, st.st_size, st.st_mtime_ns))
        except OSError:
            state.append((key, None, None))
    return tuple(state)


def model_for(cfg: Config, exp: Experiment, name: str | None = None, **overrides) -> SplitModel:
    """The config's model (``name`` instead, where given), initialised from the seed; ``overrides`` replace
    the model's options (``classifier="cosine"``); then the client method's
    :meth:`~fedlt.client_method.ClientMethod.adapt_model` (e.g. FedETF's classifier)."""
    name = name or cfg.model.name
    kw = {**cfg.model.model_dump(exclude={"name"}), **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seeded_rng(cfg.seed, Stream.INIT).integers(2**31)))
        model = build_model(name, exp.num_classes, exp.in_channels, **kw)
        check_input_size(model, name, kw, exp)
        client = cfg.client.name
        return model if client is None else CLIENTS.get(client).adapt_model(model, cfg, exp.num_classes)


def check_overridden_model_keys(cfg: Config, overrides: dict) -> None:
    """Refuse a model key the config sets (``model.num_experts=5``) that ``overrides`` replace with another value
    (BalPoE builds one expert per τ): the run would use the method's value while config.yaml records the
    config's. The centralized methods' models are the callers that override
    (:meth:`~fedlt.centralized.base.CentralizedMethod.model_options`); :func:`fedlt.simulate.check_data` asks
    before any run of a config trains, on the config as given (a config rebuilt from a dump, as in a client
    process, has every key set)."""
    for key, value in overrides.items():
        given = getattr(cfg.model, key, None)
        if key in cfg.model.model_fields_set and given != value:
            raise FedLTError(f"model.{key}={given} is not what centralized.method={cfg.centralized.method} builds: "
                             f"its model has {key}={value}; drop model.{key} or set it to {value}")


_INPUT_CHECKED: set[tuple] = set()  # (model, its options, image shape) whose dry forward ran in this process
_TOO_SMALL = ("too small", "Kernel size can't be greater", "padding should be at most half")


def check_input_size(model: SplitModel, name: str, options: dict, exp: Experiment) -> None:
    """Run ``model`` once on one blank image of the experiment's shape (on the CPU, no gradient; once per model,
    options and shape in a process): images too small for its pooling are a :class:`FedLTError` before training."""
    images = getattr(getattr(exp, "train", None), "images", None)  # None: not decoded, or a stand-in of the tests
    if images is None:
        return
    shape = tuple(images.shape[1:])
    key = (name, repr(sorted(options.items())), exp.num_classes, shape)
    if key in _INPUT_CHECKED:
        return
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *shape)))
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in _TOO_SMALL):
            raise
        raise FedLTError(f"images of {shape[-2]}×{shape[-1]} pixels are too small for model {name}: "
                         f"{str(exc).splitlines()[0]}; use larger images (a file list's data.image_size) or "
                         f"another model.name") from None
    finally:
        model.train(was_training)
    _INPUT_CHECKED.add(key)


def augment_for(cfg: Config, data: TensorData | Experiment) -> Augment:
    """The config's crop/flip (+ Cutout) for batches normalised with ``data``'s mean/std (the crop pads with
    black)."""
    return Augment(cfg.data.crop_padding, cfg.data.flip, data.mean, data.std, cfg.data.cutout)
