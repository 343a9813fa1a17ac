"""The run's configuration: one typed :class:`Config`, read from YAML plus ``dotted.key=value`` overrides.

Configs are data. A YAML file and the overrides give a nested mapping; :func:`resolve` turns it into a
:class:`Config` before any training:

- the fixed sections (``partition``, ``train``, ``federation``, ``eval``) are pydantic models below;
- the part sections (``data``, ``model``, ``strategy``, ``client``, ``centralized``) are validated by the
  ``Options`` of the part their name selects (:mod:`fedlt.options`), so a part's own defaults hold unless
  the user sets a key (``model.classifier`` of a multi-expert model is ``cosine``, of ResNet-32 ``linear``);
- ``client.name`` defaults to the strategy's paired client (a wrapper's: the innermost wrapped strategy's),
  ``model.name`` to the data set's model;
- an unknown key, a wrong type, NaN or a value out of range is a one-line :class:`FedLTError`; a key that
  the selected part does not declare names the parts that do.

Code reads attributes (``cfg.federation.rounds``, ``cfg.strategy.mu``). ``config.yaml`` in a run directory
is :func:`dump_config` of the resolved config.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator

from fedlt.errors import FedLTError, did_you_mean
from fedlt.options import (
    CentralizedOptions,
    ClientOptions,
    DataOptions,
    ModelOptions,
    Options,
    StrategyOptions,
    milestones_unused,
    option_rows,
    step_milestones,
)

# the partition keys each partition method reads (fedlt.experiment.partition_labels); the others' are unread
PARTITION_READS = {"dirichlet": ("alpha", "min_size", "balance"), "creff_dirichlet": ("alpha", "min_size"),
                   "multinomial_dirichlet": ("alpha", "min_size"), "shards": ("shards_per_client",), "iid": ()}
PARTITION_KEYS = ("alpha", "min_size", "balance", "shards_per_client")


class PartitionConfig(Options):
    """How the long-tailed training set is split across clients."""

    method: Literal["dirichlet", "creff_dirichlet", "multinomial_dirichlet", "shards", "iid"] = Field(
        "dirichlet", description="dirichlet | creff_dirichlet (CReFF-FL's routine: balanced Dirichlet in groups of "
        "10 clients, then equal-size clients, always balanced) | multinomial_dirichlet (FedLoGe's / Fed-GraB's: "
        "each sample to a client drawn from its class's Dir(α) proportions, no redraw) | shards | iid")
    num_clients: int = Field(10, gt=0, description="number of clients K")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration α (smaller: more skew)")
    min_size: int = Field(10, ge=0, description="Dirichlet: redraw until every client holds at least this many "
                          "(creff_dirichlet, multinomial_dirichlet: an error unless every client holds this many)")
    balance: bool = Field(False, description="Dirichlet: NIID-Bench's balance trick (no class to clients holding "
                          "≥ N/K; GBME's protocol); false: the plain per-class Dirichlet")
    shards_per_client: int = Field(2, gt=0, description="shards: label-sorted shards per client")

    def unused(self, cfg: Any, section: str) -> list[str]:
        reads = PARTITION_READS[self.method]
        return super().unused(cfg, section) + self.unread(
            section, tuple(k for k in PARTITION_KEYS if k not in reads),
            f"{section}.method={self.method} reads " + (", ".join(f"{section}.{k}" for k in reads) + " only" if reads
                                                        else f"none of {', '.join(PARTITION_KEYS)}"))


class TrainConfig(Options):
    """Every client's local training."""

    local_epochs: float = Field(1.0, gt=0, description="local epochs per round (unless local_steps)")
    local_steps: int | None = Field(None, gt=0, description="local SGD steps per round (replaces local_epochs)")
    lr: float = Field(0.05, gt=0, description="client learning rate (round 1 of federation.lr_schedule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, in [0, 1)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    nesterov: bool = Field(False, description="Nesterov momentum")
    batch_size: int = Field(64, ge=2, description="local batch size (≥ 2: a batch of one sample is dropped, BatchNorm)")


class FederationConfig(Options):
    """Rounds, participation, the clients' lr over rounds, failures and resources."""

    engine: Literal["flower", "inprocess", "fused"] = Field(
        "flower", description="flower (Ray, one ClientApp per client) | inprocess (the same, in this process) | "
                              "fused (a round's clients trained as one stacked model, fedlt/federation/fused.py)")
    hosts: int = Field(0, ge=0, description="0: one Flower node per client; H >= 1: H host nodes, each holding a "
                       "contiguous share of the clients and training its share of a round fused "
                       "(fedlt/federation/hosts.py; engines flower and inprocess, and deployments)")
    rounds: int = Field(20, gt=0, description="federated rounds T")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of the clients sampled per round, in (0, 1]")
    lr_schedule: Literal["constant", "step", "cosine"] = Field("constant", description="clients' lr over rounds")
    lr_milestones: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list,
                                                             description="rounds at which a step schedule decays")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="decay factor of the step schedule, in (0, 1]")
    max_failures: int = Field(0, ge=0, description="client failures tolerated over the run before it stops")
    failure_rate: float = Field(0.0, ge=0, lt=1, description="probability that a sampled client fails in a round "
                                "(injected, for robustness studies), in [0, 1)")
    client_cpus: float = Field(1.0, gt=0, description="CPUs per simulated client (Ray), or per host node")
    client_gpus: float | None = Field(None, ge=0, description="GPU fraction per client, or per host node (None: "
                                      "with a GPU 0.25 per client, a host its share of the GPUs up to 1; else 0)")
    checkpoint_every: int = Field(1, gt=0, description="checkpoint every N rounds (and after the last)")
    discovery_timeout: float = Field(600.0, gt=0, description="seconds to wait for every client node to connect "
                                     "and report its partition id (a busy machine starts Ray's actors slowly)")

    @field_validator("lr_milestones")
    @classmethod
    def _step_has_milestones(cls, value: list[int], info: ValidationInfo) -> list[int]:
        return step_milestones(value, info.data.get("lr_schedule"), "federation.lr_schedule", "round")

    def unused(self, cfg: Any, section: str) -> list[str]:
        out = super().unused(cfg, section)
        if self.lr_schedule != "step":
            out += self.unread(section, ("lr_gamma",), f"it decays a step schedule, and {section}.lr_schedule="
                                                       f"{self.lr_schedule}")
        return out + milestones_unused(f"{section}.lr_milestones", self.lr_milestones, f"{section}.lr_schedule",
                                       self.lr_schedule, f"{section}.rounds", self.rounds, "round m")


class EvalConfig(Options):
    """Test-set evaluation."""

    batch_size: int = Field(1024, gt=0, description="evaluation batch size")
    every: int = Field(1, gt=0, description="evaluate every N rounds / epochs (and after the last)")
    local: Literal["off", "final", "every"] = Field(
        "off", description="personalised (local) evaluation of a federated run: each client's personalised model "
        "on its own local test set (fedlt/federation/local_eval.py), at the final evaluation or at every one")
    finetune_epochs: float = Field(0.0, ge=0, description="local evaluation: epochs of local cross-entropy "
                                   "fine-tuning of the global model before it is evaluated (FedAvg+FT; 0: none)")

    def unused(self, cfg: Any, section: str) -> list[str]:
        out = super().unused(cfg, section)
        if cfg.mode != "centralized" and self.finetune_epochs and self.local == "off":
            out.append(f"{section}.finetune_epochs={self.finetune_epochs:g} has no effect with {section}.local=off "
                       f"(it fine-tunes the model of the local evaluation)")
        return out


class Config(Options):
    """One run: data, partition, model, federated and centralized training, evaluation."""

    name: str = Field("run", description="run name (first part of the run directory's name)")
    seed: int = Field(0, ge=0, description="every random choice flows from it")
    mode: Literal["federated", "centralized", "both"] = Field("both", description="federated | centralized | both")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    plugins: list[str] = Field(default_factory=list, description="extra plug-in modules to import")
    data: SerializeAsAny[DataOptions] = Field(default_factory=DataOptions)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: SerializeAsAny[ModelOptions] = Field(default_factory=ModelOptions)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    strategy: SerializeAsAny[StrategyOptions] = Field(default_factory=StrategyOptions)
    client: SerializeAsAny[ClientOptions] = Field(default_factory=ClientOptions)
    centralized: SerializeAsAny[CentralizedOptions] = Field(default_factory=CentralizedOptions)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: dict[str, Any] = Field(default_factory=dict, description="dotted key -> list of values (fedlt.sweep)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in ("", ".", "..") or "/" in v or "\\" in v or v.startswith("-") or not v.isprintable():
            raise ValueError("must be a plain name (the start of the run directory's name inside --out), without "
                             "/ or \\ or control characters, not . or .., not starting with -")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole fields replaced (e.g. ``cfg.replace(mode="federated")``), not re-validated."""
        return self.model_copy(update=sections)


FIXED_SECTIONS: dict[str, type[Options]] = {"partition": PartitionConfig, "train": TrainConfig,
                                            "federation": FederationConfig, "eval": EvalConfig}


def _part_sections() -> dict[str, tuple[Any, str]]:
    """section -> (registry of its parts, the key that names the part)."""
    from fedlt.registry import CENTRALIZED, CLIENTS, DATASETS, MODELS, STRATEGIES

    return {"data": (DATASETS, "name"), "model": (MODELS, "name"), "strategy": (STRATEGIES, "name"),
            "client": (CLIENTS, "name"), "centralized": (CENTRALIZED, "method")}


# ------------------------------------------------------------------------------------------ reading

def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value; numbers decimal only, see :class:`_ConfigLoader`); an empty value
    is an error."""
    if "=" not in item:
        raise FedLTError(f"override {item!r} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    if any(not part.strip() for part in key.split(".")):
        raise FedLTError(f"override {item!r}: the key {key.strip()!r} has an empty part (KEY is a dotted path such as "
                         f"train.lr)")
    if not raw.strip():  # `data.root=$ROOT` with ROOT unset read the data set's default folder without a word
        raise FedLTError(f"override {item!r} has no value (an unset shell variable?): give one, or {key.strip()}=null "
                         f"for none")
    try:
        value = yaml.load(raw, Loader=_ConfigLoader)
    except _BadKey as exc:
        raise FedLTError(f"override {item!r}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b] = value`` for key ``a.b``, creating the mappings on the way."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FedLTError(f"config key {'.'.join(parts[:i + 1])!r} is not a section, so {key!r} cannot be set")
        node = child
    node[parts[-1]] = value


class _BadKey(Exception):
    """A mapping key of a config file that :class:`_ConfigLoader` refuses: ``line`` (1-based) and what is wrong."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line, self.problem = line, problem


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (YAML 1.1 as before: ``1e-3`` stays a string that the float keys read as a
    number) whose mappings refuse a key given twice (YAML would keep the last one silently) and a key that is
    not a name (``1: 2``, ``null: x``, ``yes: 1``), and whose numbers are decimal only: YAML 1.1 reads ``010`` as
    8 (octal), ``0x10`` as 16 and ``1:30`` as 90 (base 60), so ``seed=010`` ran seed 8; here they stay strings,
    which a number key refuses in one line (a name key takes them as written)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            _check_keys(self, node)
        return super().construct_mapping(node, deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _check_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """Raise :class:`_BadKey` for the first key of ``node`` that is not a string or that it gives twice
    (``<<`` merge keys aside: the keys written next to them replace the merged ones, as YAML means)."""
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise _BadKey(line, "a key is a list or mapping, not a name: config keys are names (key: value)")
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            raise _BadKey(line, f"key {key_node.value} is not a name (YAML reads it as {type(key).__name__} "
                                f"{key!r}): config keys are names; quote it if you meant one ('{key_node.value}': ...)")
        if key in seen:
            raise _BadKey(line, f"key {key!r} given twice: give it once")
        seen.add(key)


def _key_given_twice(mapping: dict) -> str | None:
    """The first dotted key that ``mapping`` gives both nested and dotted (``train: {lr: ..}`` and
    ``train.lr: ..``, e.g. in ``sweep:``), or None."""
    seen: set[str] = set()
    for key in _leaves(mapping):
        if key in seen:
            return key
        seen.add(key)
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what: "line 5, column 1: found character '\\t' that cannot start any token" (a tab), not only
    the parser's first line ("while scanning for the next token")."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise FedLTError(f"config file {path} is a folder: give one of its .yaml files")
    if not path.is_file():
        raise FedLTError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FedLTError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"save it as UTF-8") from None
    except OSError as exc:
        raise FedLTError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)
    except _BadKey as exc:
        raise FedLTError(f"config file {path} line {exc.line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise FedLTError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if raw is None:  # a truncated or unsaved file would run every default under its name
        raise FedLTError(f"config file {path} is empty (no key, or only comments): give its keys, or leave out "
                         f"--config to run the defaults")
    if not isinstance(raw, dict):
        raise FedLTError(f"config file {path} must hold a mapping at the top level")
    try:
        twice = _key_given_twice(raw)
    except RecursionError:
        raise FedLTError(f"config file {path}: a mapping holds itself (an alias *x inside its own anchor &x) "
                         f"or is nested too deep") from None
    if twice is not None:
        raise FedLTError(f"config file {path}: key {twice!r} given twice (nested and dotted): give it once")
    return raw


def deep_merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key, anything else (lists included) is replaced; an empty
    section (``train:`` with every key commented out: null) over a mapping changes nothing (it replaced the base's
    section by the defaults without a word)."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if value is None and isinstance(out.get(key), dict):
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaves(mapping: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the non-mapping values of a nested mapping (an empty mapping is a leaf)."""
    out = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        out += _leaves(value, dotted + ".") if isinstance(value, dict) and value else [dotted]
    return out


def read_config_file(path: str | Path, provenance: dict[str, str] | None = None,
                     check_base: Callable[[Path], Any] | None = None, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping, its ``base:`` chain merged under it (:func:`deep_merge`).

    ``base: other.yaml`` (a path relative to the file) names the config this one builds on: the file
    gives only what differs. Chains are allowed; a cycle or a missing base is a one-line :class:`FedLTError`.
    The ``base`` key itself does not reach the resolved config. ``provenance`` (dotted key -> "file NAME")
    is filled with the file each value comes from. ``check_base`` is called with each base's path before it is
    read (a submitted run's: it raises where the base lies outside the app folder)."""
    path = Path(path)
    raw = read_yaml(path)
    base = raw.pop("base", None)
    chain = _chain + (path.resolve(),)
    merged: dict = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise FedLTError(f"config file {path}: 'base' must name a config file, got {base!r}")
        base_path = path.parent / base
        if check_base is not None:
            check_base(base_path)
        if base_path.is_dir():
            raise FedLTError(f"config file {path}: base {base!r} is a folder, not a config file ({base_path})")
        if not base_path.is_file():
            raise FedLTError(f"config file {path}: base {base!r} not found (looked for {base_path})")
        if base_path.resolve() in chain:
            cycle = " -> ".join(p.name for p in chain + (base_path.resolve(),))
            raise FedLTError(f"config file {path}: its bases form a cycle ({cycle})")
        merged = read_config_file(base_path, provenance, check_base, chain)
    if provenance is not None:
        for key in given_keys("", raw):  # a value of the base replaced by the file's (mappings merge key by key)
            set_source(provenance, key, f"file {path.name}")
    return deep_merge(_unswept(merged, raw), raw)


def _unswept(base: dict, child: dict) -> dict:
    """``base`` without the sweep axes over a key that ``child`` sets (and does not sweep itself): a file's plain
    value fixes what its base sweeps, as a plain override on the command line does (a child of
    configs/default.yaml with ``strategy: {name: fedprox}`` ran the base's FedAvg and FedLC and never FedProx).
    Within one file, a plain value beside a sweep of the same key is the sweep's default (configs/default.yaml's
    ``strategy.name``) and the sweep runs."""
    from fedlt.sweep import flatten, keys_overlap

    axes = flatten(base["sweep"]) if isinstance(base.get("sweep"), dict) else {}
    own_axes = flatten(child["sweep"]) if isinstance(child.get("sweep"), dict) else {}
    fixed = _leaves({k: v for k, v in child.items()
                     if k != "sweep" and not (v is None and isinstance(base.get(k), dict))})  # see deep_merge
    drop = [a for a in axes if a not in own_axes and any(keys_overlap(a, f) for f in fixed)]
    if not drop:
        return base
    return {**base, "sweep": {a: v for a, v in axes.items() if a not in drop}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                provenance: dict[str, str] | None = None) -> Config:
    """YAML file (with its ``base:`` chain) <- overrides, resolved and validated (:func:`resolve`).

    ``provenance``, where given, is filled with dotted key -> where its value came from (``file NAME`` or
    ``override``) for every key the file chain or the overrides set; :func:`key_sources` adds the rest."""
    raw = read_config_file(path, provenance) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        _check_section_override(raw, key, value)
        set_dotted(raw, key, value)
        if provenance is not None:
            set_given(provenance, key, value, "override")
    _check_local_work(raw)
    return resolve(raw)


def config_plugins(path: str | Path | None, overrides: list[str] | None = None) -> list[str]:
    """The plug-in modules that a config file (with its ``base:`` chain) and a ``plugins=[...]`` override name,
    read without resolving the rest of the config: what ``--list`` and ``--keys`` import, so that they show a
    plug-in's parts and keys even where another key of the config is wrong (or names a part of that plug-in).
    Other overrides are not read (not even checked to be ``KEY=VALUE``)."""
    raw = read_config_file(path) if path is not None else {}
    for item in overrides or []:
        if item.partition("=")[0].strip() == "plugins" and "=" in item:
            raw["plugins"] = parse_override(item)[1]
    try:
        return Config.model_validate({"plugins": raw.get("plugins", [])}).plugins
    except ValidationError as exc:
        raise _error("", exc) from None


def given_keys(key: str, value: Any) -> list[str]:
    """The dotted keys that ``value`` given at ``key`` sets: ``key`` itself for a value that is not a mapping, the
    keys under it for a mapping (nested), none for an empty mapping. So a section given as a mapping labels only
    the keys it holds: ``strategy.base_options={base: fedavg}`` gives ``strategy.base_options.base``, and the
    wrapped strategy's other keys keep their defaults (:func:`key_sources`)."""
    if not isinstance(value, dict):
        return [key]
    return [leaf for k, v in value.items() for leaf in given_keys(f"{key}.{k}" if key else str(k), v)]


def set_given(provenance: dict[str, str], key: str, value: Any, source: str) -> None:
    """Record that ``value`` from ``source`` replaced ``key`` (an override, a swept value): what was recorded for
    ``key`` and the keys under it goes (the value replaced them), then each key the value sets
    (:func:`given_keys`) is recorded as from ``source``."""
    for old in [k for k in provenance if k == key or k.startswith(key + ".")]:
        del provenance[old]
    for leaf in given_keys(key, value):
        provenance[leaf] = source


def set_source(provenance: dict[str, str], key: str, source: str) -> None:
    """Record that ``key`` (a key or a whole section) came from ``source``, replacing what was recorded for the
    keys under it (its value replaced them)."""
    for old in [k for k in provenance if k.startswith(key + ".")]:
        del provenance[old]
    provenance[key] = source


def _check_section_override(raw: dict, key: str, value: Any) -> None:
    """Refuse an override that gives a section a mapping (``data={flip: false}``) where that would drop keys the
    config already sets in it: an override replaces what it names, so the run would take those keys' defaults
    where the user most likely meant to change the keys written (a ``base:`` file merges mappings key by key).
    ``KEY={}`` (clear it) and the ``sweep`` mapping are what they say; ``KEY=null`` (no value) where the config
    sets keys in section KEY would drop them all, and is refused the same way."""
    if key == "sweep" or key.startswith("sweep.") or (value is not None and (not isinstance(value, dict) or not value)):
        return
    from fedlt.sweep import flatten

    node: Any = raw
    for piece in key.split("."):
        node = node.get(piece) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    if value is None:
        if node:
            raise FedLTError(f"override {key}=null gives the section {key!r} no value, which would drop what the config "
                             f"sets in it ({', '.join(f'{key}.{k}' for k in flatten(node))}): give its keys as "
                             f"{key}.KEY=VALUE, or {key}={{}} to clear it")
        return
    given = flatten(value)
    dropped = [k for k in flatten(node) if k not in given and not any(k.startswith(g + ".") for g in given)]
    if dropped:
        keys = ", ".join(f"{key}.{k}" for k in dropped)
        raise FedLTError(f"override {key}={yaml.safe_dump(value, default_flow_style=True).strip()} would replace the "
                         f"whole section {key!r} and drop what the config sets in it ({keys}): give each key as "
                         f"{key}.KEY=VALUE, or repeat those keys in the mapping")


def _check_local_work(raw: dict) -> None:
    """``train.local_epochs`` and ``train.local_steps`` both given by the user is an error (not "steps win").
    Read from the user's raw mapping: ``local_epochs`` has a default, so the resolved config cannot tell."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return
    if "local_epochs" in train and train["local_epochs"] is None:  # dropped (e.g. a base file's value)
        del train["local_epochs"]
    if train.get("local_epochs") is not None and train.get("local_steps") is not None:
        raise FedLTError("config keys 'train.local_epochs' and 'train.local_steps' are both set: a client trains "
                         "either epochs or steps per round; give one (train.local_epochs=null drops a file's)")


# ------------------------------------------------------------------------------------------ validating

def _describe(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return repr(value)
    return repr(value) if not isinstance(value, dict) else "a mapping"


RULES = {"int_parsing": "must be int", "int_type": "must be int", "int_from_float": "must be int",
         "float_parsing": "must be float", "float_type": "must be float", "bool_parsing": "must be bool",
         "bool_type": "must be bool", "string_type": "must be str", "list_type": "must be a list",
         "dict_type": "must be a mapping", "finite_number": "must be a finite number",
         "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
         "less_than_equal": "must be <= {le}", "literal_error": "must be one of {expected}",
         "too_short": "must list at least {min_length} value(s)"}


def _error(section: str, exc: ValidationError, owner: str = "") -> FedLTError:
    """The first error of ``exc`` as one line naming the dotted key and the rule."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    key = f"{section}.{loc}" if section else loc
    if not loc:  # a check across keys (a model_validator): its message, which names the keys itself
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        return FedLTError(f"config section {section!r}: {msg}" if section else f"config: {msg}")
    if err["type"] == "extra_forbidden":
        return FedLTError(_unknown_key_message(section, loc, owner))
    rule = RULES.get(err["type"])
    if rule is not None:
        ctx = {k: f"{v:g}" if isinstance(v, (int, float)) else str(v).replace("'", "")
               for k, v in (err.get("ctx") or {}).items()}
        rule = rule.format(**ctx)
    else:
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        rule = msg[0].lower() + msg[1:]
    return FedLTError(f"config key {key!r} {rule}, got {_describe(err.get('input'))}")


def _unknown_key_message(section: str, key: str, owner: str) -> str:
    """``client.mu is not an option of client method 'fedavg'; fedprox takes it as strategy.mu``."""
    dotted = f"{section}.{key}" if section else key
    if not section or section in FIXED_SECTIONS:
        known = FIXED_SECTIONS[section].model_fields if section else Config.model_fields
        return f"unknown config key {dotted!r}" + did_you_mean(key, known, f"{section}." if section else "")
    takers = []
    for other, (registry, _) in _part_sections().items():
        names = [name for name in registry if key.split(".")[0] in registry.options(name).model_fields]
        if names:
            kind = registry.plural if len(names) > 1 else registry.kind
            takers.append(f"{kind} {', '.join(names)} take{'s' if len(names) == 1 else ''} it as {other}.{key}")
    registry = _part_sections()[section.split(".")[0]][0]
    if owner in registry and "base_options" in registry.options(owner).model_fields and takers:
        takers.insert(0, f"{owner} wraps strategy.base, whose keys are {section}.base_options.*")
    where = f"; {'; '.join(takers)}" if takers else ""
    close = did_you_mean(key, registry.options(owner).model_fields, f"{section}.") if (
        owner in registry and "." not in section and not takers) else ""
    return f"unknown config key {dotted!r}{close}: not an option of {registry.kind} {owner!r}{where}"


def validate_section(section: str, raw: Any, options: type[Options], owner: str = "") -> Options:
    """``raw`` (a mapping) validated by ``options``; errors as one-line :class:`FedLTError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FedLTError(f"config key {section!r} must be a mapping, got {raw!r}")
    try:
        return options.model_validate(raw)
    except ValidationError as exc:
        raise _error(section, exc, owner) from None


def resolve(raw: dict) -> Config:
    """Validate a nested mapping into a :class:`Config` (parts' ``Options`` filled). Raises :class:`FedLTError`."""
    from fedlt.registry import DATASETS, import_plugins

    if not isinstance(raw, dict):
        raise FedLTError("a config must be a mapping")
    raw = copy.deepcopy(raw)
    parts = _part_sections()
    for key, value in raw.items():
        if key not in Config.model_fields:
            inner = f".{next(iter(value))}" if isinstance(value, dict) and value else ""
            raise FedLTError(f"unknown config key {key + inner!r}{did_you_mean(key, Config.model_fields, '', inner)}")
    plain = {k: v for k, v in raw.items() if k not in parts and k not in FIXED_SECTIONS}
    try:
        top = Config.model_validate(plain)
    except ValidationError as exc:
        raise _error("", exc) from None
    import_plugins(top.plugins)
    sections: dict[str, Options] = {}
    for section, options in FIXED_SECTIONS.items():
        sections[section] = validate_section(section, raw.get(section), options)

    given = {s: dict(raw.get(s) or {}) if isinstance(raw.get(s) or {}, dict) else raw.get(s) for s in parts}
    for section in parts:
        if not isinstance(given[section], dict):
            raise FedLTError(f"config key {section!r} must be a mapping, got {given[section]!r}")
    # the names that select the parts, with the defaults that depend on other sections
    for section, name_key in (("data", "name"), ("strategy", "name"), ("centralized", "method")):
        if name_key in given[section] and given[section][name_key] is None:  # ``strategy.name=`` or ``name: null``
            raise FedLTError(f"config key '{section}.{name_key}' needs a name, got an empty value (--list shows "
                             f"the names)")
    data_name = given["data"].get("name", DataOptions.model_fields["name"].default)
    DATASETS.get(str(data_name))
    if given["model"].get("name") is None:
        given["model"]["name"] = DATASETS.meta[data_name]["model"]
    strategy_name = given["strategy"].get("name", StrategyOptions.model_fields["name"].default)
    if given["client"].get("name") is None:
        given["client"]["name"] = own_client(paired_strategy({**given["strategy"], "name": strategy_name}))
    for section, (registry, name_key) in parts.items():
        name = given[section].get(name_key, ClientOptions.model_fields["name"].default)
        if name is None:
            name = Config.model_fields[section].default_factory().model_dump()[name_key]
        if not isinstance(name, str):
            raise FedLTError(f"config key '{section}.{name_key}' must be a name, got {name!r}")
        registry.get(name)
        sections[section] = validate_section(section, {**given[section], name_key: name}, registry.options(name),
                                             name)
    cfg = top.replace(**sections)
    _check_hosts(cfg)
    _check_nesterov(cfg)
    check_parts(cfg)
    return cfg


def _check_hosts(cfg: Config) -> None:
    """``federation.hosts``: at most one host per client, and not with the fused engine (already one host)."""
    fed = cfg.federation
    if fed.hosts > cfg.partition.num_clients:
        raise FedLTError(f"config key 'federation.hosts' must be <= partition.num_clients={cfg.partition.num_clients} "
                         f"(each host holds at least one client), got {fed.hosts}")
    if fed.hosts and fed.engine == "fused":
        raise FedLTError(f"config key 'federation.hosts' ({fed.hosts}) applies to the flower and inprocess engines: "
                         f"federation.engine=fused is already one host training every client in this process")


def _check_nesterov(cfg: Config) -> None:
    """Nesterov momentum needs momentum: PyTorch's SGD refuses ``nesterov=True`` with momentum 0, and fedlt's
    optimizer turned it off without a word. Checked for the training the run's ``mode`` does (the centralized
    keys fall back to ``train``'s)."""
    t, c = cfg.train, cfg.centralized
    runs = [] if cfg.mode == "centralized" else [("clients'", t.nesterov, "train.nesterov", t.momentum,
                                                   "train.momentum")]
    if cfg.mode != "federated":
        runs.append(("centralized", t.nesterov if c.nesterov is None else c.nesterov,
                     "train.nesterov" if c.nesterov is None else "centralized.nesterov",
                     t.momentum if c.momentum is None else c.momentum,
                     "train.momentum" if c.momentum is None else "centralized.momentum"))
    for what, nesterov, nesterov_key, momentum, momentum_key in runs:
        if nesterov and momentum == 0:
            raise FedLTError(f"config key {nesterov_key!r} asks for Nesterov momentum in the {what} training, whose "
                             f"momentum is 0 ({momentum_key}): Nesterov needs momentum > 0")


def check_parts(cfg: Config) -> None:
    """The checks across sections that a selected part declares: ``check_config(cfg)``, a classmethod of a
    strategy, client method or centralized method, raising a one-line :class:`FedLTError` (e.g. GBME needs a
    multi-expert model), then a client method's :attr:`~fedlt.client_method.ClientMethod.strategy`, a
    ``client_only`` strategy's client, and a client key its strategy sends in its place (:func:`sent_client_keys`).
    Only the parts the run's ``mode`` uses are asked."""
    from fedlt.registry import CENTRALIZED, CLIENTS, STRATEGIES

    parts = []
    if cfg.mode in ("federated", "both"):
        parts += [(STRATEGIES, cfg.strategy.name), (CLIENTS, cfg.client.name)]
    if cfg.mode in ("centralized", "both"):
        parts.append((CENTRALIZED, cfg.centralized.method))
    for registry, name in parts:
        check = getattr(registry.get(name), "check_config", None)
        if check is not None:
            try:
                check(cfg)
            except (ValueError, TypeError) as exc:  # a plug-in's refusal not raised as FedLTError: the same one line
                message = (str(exc).splitlines() or [""])[0] or type(exc).__name__
                raise FedLTError(f"{registry.kind} {name}: {message}") from None
    if cfg.mode in ("federated", "both"):
        client = CLIENTS.get(cfg.client.name)
        chain = strategy_chain(cfg.strategy)  # the strategy and, where it wraps another, the ones it wraps
        needs = getattr(client, "strategy", None)  # a client method that needs its strategy (ClientMethod.strategy)
        if needs is not None and not any(issubclass(STRATEGIES.get(s.name), STRATEGIES.get(needs)) for _, s in chain):
            raise FedLTError(f"client.name={cfg.client.name} trains under strategy {needs} (its messages and the "
                             f"replies only it aggregates), not {cfg.strategy.name!r}: set strategy.name={needs}")
        for key, section in chain:  # a strategy that is FedAvg but for its own client (FedLTStrategy.client_only)
            strategy = STRATEGIES.get(section.name)
            if getattr(strategy, "client_only", False) and not issubclass(client, CLIENTS.get(strategy.client)):
                raise FedLTError(
                    f"{key}={section.name} is FedAvg on the server and client method {strategy.client} on the "
                    f"clients (its keys reach only that client), so with client.name={cfg.client.name} it would run "
                    f"{key}=fedavg under another name: set client.name={strategy.client} or {key}=fedavg")
        for k, (key, name, sent) in sent_client_keys(cfg).items():  # a value other than the client's default
            if getattr(cfg.client, k) != type(cfg.client).model_fields[k].default:  # (a dump sets every field)
                raise FedLTError(f"client.{k} is not read under {key}={name}: its server sends its own {sent} (now "
                                 f"{_get_dotted(cfg, sent)}) to every client; set {sent}={getattr(cfg.client, k)} "
                                 f"instead")


def sent_client_keys(cfg: Config) -> dict[str, tuple[str, str, str]]:
    """The client options a strategy of ``cfg``'s chain sends to every client from its own option of the same name
    (:attr:`~fedlt.federation.strategy.FedLTStrategy.sends`, where the client is that strategy's own), so the
    client's value is never read: option -> (the key naming the strategy, its name, the dotted key sent)."""
    from fedlt.registry import CLIENTS, STRATEGIES

    out = {}
    for key, section in strategy_chain(cfg.strategy):
        strategy = STRATEGIES.get(section.name)
        if issubclass(CLIENTS.get(cfg.client.name), CLIENTS.get(strategy.client)):
            # the section holding the strategy's own keys: strategy (for strategy.name), else the wrapper's
            # base_options (strategy.base -> strategy.base_options)
            prefix = "strategy" if key == "strategy.name" else key.removesuffix(".base") + ".base_options"
            out.update({k: (key, section.name, f"{prefix}.{k}") for k in strategy.sends})
    return out


def _get_dotted(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for piece in key.split("."):
        value = getattr(value, piece)
    return value


def strategy_chain(section: StrategyOptions) -> list[tuple[str, StrategyOptions]]:
    """The strategy section and, where it is a wrapper's, the sections of the strategies it wraps, innermost
    last, each with the config key that names it (``strategy.name``, ``strategy.base``,
    ``strategy.base_options.base`` …)."""
    chain, key, prefix = [], "strategy.name", "strategy"
    while isinstance(section, StrategyOptions):
        chain.append((key, section))
        key, prefix = f"{prefix}.base", f"{prefix}.base_options"
        section = getattr(section, "base_options", None)
    return chain


def paired_strategy(section: dict) -> str:
    """The strategy whose client method a (raw) strategy section pairs with: the strategy itself, or for a
    wrapper (``strategy.base=...``) the innermost strategy it wraps, so that ``posthoc_calibration`` over
    ``fedlc`` trains FedLC's clients. A base that is not a registered name stops the walk (its key's own check
    reports it)."""
    from fedlt.registry import STRATEGIES

    name = str(section.get("name", StrategyOptions.model_fields["name"].default))
    while "base" in STRATEGIES.options(name).model_fields:  # a wrapper
        base = section.get("base", STRATEGIES.options(name).model_fields["base"].default)
        if not isinstance(base, str) or base not in STRATEGIES:
            break
        inner = section.get("base_options")
        name, section = base, inner if isinstance(inner, dict) else {}
    return name


def own_client(strategy: str) -> str:
    """The client method a strategy pairs with (``client.name``'s default)."""
    from fedlt.registry import STRATEGIES

    return getattr(STRATEGIES.get(strategy), "client", "fedavg")


def federated_method(cfg: Config) -> str:
    """What a federated run runs: the strategy's name, ``+`` the client method where it is not the strategy's own
    (``fedavg+fedprox``). A ``local_loss`` client is named by its loss (``fedavg+la``, not ``fedavg+local_loss``):
    the loss is what sets two such runs apart, and a paper writes "FedAvg + LA". Used in run directory names,
    progress lines and summary.json's ``method`` (the report's Method column)."""
    client = cfg.client.name
    if client == own_client(cfg.strategy.name):
        return cfg.strategy.name
    return f"{cfg.strategy.name}+{getattr(cfg.client, 'loss', None) if client == 'local_loss' else client}"


def key_sources(cfg: Config, given: dict[str, str]) -> dict[str, str]:
    """Every dotted key of the resolved ``cfg`` -> where its value came from: ``given``'s entry (from
    :func:`load_config`'s ``provenance``: a file, an override, a sweep) for a key or a mapping above it; else
    ``derived`` (``model.name`` from the data set, ``client.name`` from the strategy), the selected part's own
    default (where its ``Options`` declare the key or a default other than the section's base), or ``default``."""
    from fedlt.sweep import flatten

    parts = _part_sections()
    sent = sent_client_keys(cfg) if cfg.mode != "centralized" else {}
    out = {}
    for key in flatten(cfg.model_dump(mode="json", exclude={"sweep"})):
        pieces = key.split(".")
        source = next((given[".".join(pieces[:i])] for i in range(len(pieces), 0, -1)
                       if ".".join(pieces[:i]) in given), None)
        if source is None:
            section, field = pieces[0], pieces[1] if len(pieces) > 1 else ""
            if key == "model.name":
                source = f"derived from data set {cfg.data.name}"
            elif key == "client.name":
                paired = strategy_chain(cfg.strategy)[-1][1].name  # the innermost wrapped strategy
                source = f"derived from strategy {paired}" + (f", wrapped by {cfg.strategy.name}"
                                                               if paired != cfg.strategy.name else "")
            elif section == "client" and field in sent:
                source = f"not read: {sent[field][0]}={sent[field][1]} sends {sent[field][2]}"
            elif section == "strategy" and field == "base_options":
                source = _wrapped_source(cfg.strategy, key)
            elif section in parts:
                registry, name_key = parts[section]
                name = getattr(getattr(cfg, section), name_key)
                base = registry.base_options.model_fields.get(field)
                own = registry.options(name).model_fields.get(field)
                if own is not None and (base is None or own.get_default(call_default_factory=True)
                                        != base.get_default(call_default_factory=True)):
                    source = f"default of {registry.kind} {name}"
            out[key] = source or "default"
        else:
            out[key] = source
    return out


def _wrapped_source(section: StrategyOptions, key: str) -> str:
    """Where a key under a wrapper's ``strategy.base_options`` (not given) came from, as :func:`key_sources` says it:
    the wrapped strategy's name is derived from the key naming it (``strategy.base``), its other keys are that
    strategy's defaults (or the section's, where it declares none of its own), however deep the nesting."""
    from fedlt.registry import STRATEGIES

    chain = strategy_chain(section)
    prefixes = ["strategy" + ".base_options" * i for i in range(len(chain))]  # chain[i]'s keys are under prefixes[i]
    i = max(j for j, p in enumerate(prefixes) if key.startswith(p + "."))
    naming, inner = chain[i]
    field = key[len(prefixes[i]) + 1:].split(".")[0]
    if i and field == "name":
        return f"derived from {naming}"
    base = StrategyOptions.model_fields.get(field)
    own = STRATEGIES.options(inner.name).model_fields.get(field)
    if own is not None and (base is None or own.get_default(call_default_factory=True)
                            != base.get_default(call_default_factory=True)):
        return f"default of strategy {inner.name}"
    return "default"


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds), loadable again as a ``--config``: with
    ``train.local_steps`` set, ``train.local_epochs`` (unused) is written null."""
    data = cfg.model_dump(mode="json", exclude={"sweep"})
    if data["train"].get("local_steps") is not None:
        data["train"]["local_epochs"] = None
    return yaml.safe_dump(data, sort_keys=False)


def config_from_dict(data: dict) -> Config:
    """A :class:`Config` from a resolved config's plain mapping (``cfg.model_dump()``), e.g. in a client process."""
    return resolve(data)


# ------------------------------------------------------------------------------------------ documenting

def key_rows(part: str | None = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every config key, or of one part's section (``--keys PART``):
    PART is a section (``train``) or a registered part's name (``fedprox``, ``resnet32``, ``ldam_drw``)."""
    rows: list[tuple[str, str, str, str]] = []
    top = [r for r in option_rows(Config, "") if r[0] not in FIXED_SECTIONS and r[0] not in _part_sections()]
    if part is None:
        rows += top
    for section, options in FIXED_SECTIONS.items():
        if part in (None, section):
            rows += option_rows(options, f"{section}.")
    for section, (registry, name_key) in _part_sections().items():
        if part in (None, section):
            rows += option_rows(registry.base_options, f"{section}.")
        for name in registry:
            if part in (None, section, name):
                options = registry.options(name)
                own = [r for r in option_rows(options, f"{section}.")
                       if part == name or r[0].split(".", 1)[1] not in registry.base_options.model_fields
                       or r[2] != repr(registry.base_options.model_fields[r[0].split(".", 1)[1]].default)]
                # the key that selects the part: its value here is the part's name, not the section's default
                own = [(k, t, repr(name), f"{name!r} selects it") if k == f"{section}.{name_key}" else (k, t, d, desc)
                       for k, t, d, desc in own]
                rows += [(k, t, d, f"[{registry.kind} {name}] {desc}") for k, t, d, desc in own]
    rows += loss_option_rows(part)
    if not rows:
        raise FedLTError(f"--keys {part}: no section or registered part of that name (see --list)")
    return rows


def loss_option_rows(part: str | None = None) -> list[tuple[str, str, str, str]]:
    """The options of every zoo loss (or of the loss named ``part``), as a client method's loss takes them
    (``client.loss=focal client.loss_options.gamma=3``). Losses are no config section of their own: a centralized
    method names its loss's options as its own keys."""
    from fedlt.registry import LOSSES

    rows = []
    for name in LOSSES:
        if part in (None, name):
            rows += [(k, t, d, f"[loss {name}] {desc} (with client.loss={name})")
                     for k, t, d, desc in option_rows(LOSSES.options(name), "client.loss_options.")]
    return rows


def format_keys(part: str | None = None) -> str:
    rows = key_rows(part)
    kw, tw, dw = (min(max(len(r[i]) for r in rows), cap) for i, cap in ((0, 36), (1, 28), (2, 16)))
    return "\n".join(f"{k:<{kw}}  {t:<{tw}}  {d:<{dw}}  {desc}" for k, t, d, desc in rows)
