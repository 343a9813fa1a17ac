"""Configs are data: a YAML file over the defaults below, plus ``dotted.key=value`` overrides, validated
before any training. An unknown key, a wrong type or an impossible value is a :class:`FedLTError`.

Plug-ins declare their own keys: a strategy's or client method's ``options`` (a dict of defaults)
become valid keys under ``strategy.`` or ``client.``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from fedlt.errors import FedLTError

# Every key, with its default. The type of a key is the type of its default; None-valued defaults
# name their type in NULLABLE.
DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "mode": "both",  # federated | centralized | both
    "device": "auto",
    "plugins": [],  # extra plug-in modules to import (server and clients), e.g. my_lab.my_strategy
    "data": {
        "name": "fashion_mnist",
        "root": None,
        "train_list": "train.txt",
        "test_list": "test.txt",
        "image_size": None,
        "imbalance_factor": 100.0,
        "profile": "exp",  # exp | step | none (use the training set as it is)
        "crop_padding": 4,
        "flip": True,
    },
    "partition": {
        "method": "dirichlet",  # dirichlet | shards | iid
        "num_clients": 10,
        "alpha": 0.5,
        "min_size": 10,
        "balance": True,
        "shards_per_client": 2,
    },
    "model": {"name": None, "classifier": "linear", "scale": 1.0},
    "train": {  # local training of every client
        "local_epochs": 1.0,
        "local_steps": None,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "nesterov": False,
        "batch_size": 64,
    },
    "federation": {
        "rounds": 20,
        "fraction": 1.0,
        "lr_schedule": "constant",  # over rounds: constant | step | cosine
        "lr_milestones": [],  # rounds, for step
        "lr_gamma": 0.1,
        "max_failures": 0,  # client failures tolerated over the run before it stops
        "client_cpus": 1.0,
        "client_gpus": None,  # GPU fraction per client; None: 0.25 with a GPU, else 0
        "checkpoint_every": 1,
    },
    "strategy": {"name": "fedavg"},
    "client": {"name": None},  # None: the strategy's paired client method
    "centralized": {
        "method": "ce",
        "epochs": 10.0,
        "lr": None,  # None: train.lr
        "batch_size": None,  # None: train.batch_size
        "momentum": None,
        "weight_decay": None,
        "nesterov": None,
        "warmup_epochs": 0.0,
        "schedule": "cosine",  # constant | step | cosine
        "milestones": [],
        "gamma": 0.1,
    },
    "eval": {"batch_size": 1024, "every": 1},
    "sweep": {},  # dotted key -> list of values; expanded by fedlt.sweep (which checks its contents)
}

NULLABLE: dict[str, tuple[type, ...]] = {
    "data.root": (str,), "data.image_size": (int,), "model.name": (str,), "train.local_steps": (int,),
    "federation.client_gpus": (float, int), "client.name": (str,), "centralized.lr": (float, int),
    "centralized.batch_size": (int,), "centralized.momentum": (float, int),
    "centralized.weight_decay": (float, int), "centralized.nesterov": (bool,),
}
PLUGIN_SECTIONS = ("strategy", "client")
# A centralized method's ``options`` become valid keys under ``centralized.`` beside the fixed ones.
CENTRALIZED_FIXED = tuple(DEFAULTS["centralized"])
CHOICES = {
    "mode": ("federated", "centralized", "both"),
    "data.profile": ("exp", "step", "none"),
    "partition.method": ("dirichlet", "shards", "iid"),
    "federation.lr_schedule": ("constant", "step", "cosine"),
    "centralized.schedule": ("constant", "step", "cosine"),
    "model.classifier": ("linear", "cosine"),
}


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(out.get(key), dict) and key in out:
            if not isinstance(value, dict):
                raise FedLTError(f"config key {dotted!r} must be a mapping, got {value!r}")
            out[key] = _merge(out[key], value, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise FedLTError(f"override {item!r} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise FedLTError(f"unknown config key {key!r}")
        node = node[part]
    node[parts[-1]] = value


def get_dotted(cfg: dict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML file <- overrides, then :func:`validate`. Returns the resolved config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FedLTError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FedLTError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise FedLTError(f"config file {path} must hold a mapping at the top level")
    cfg = _merge(DEFAULTS, raw)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(cfg, key, value)
    return validate(cfg)


def _check_type(key: str, value: Any, default: Any) -> Any:
    if value is None:
        if key in NULLABLE or default is None:
            return None
        raise FedLTError(f"config key {key!r} may not be null")
    types = NULLABLE.get(key) or (type(default),)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in types:
        raise FedLTError(f"config key {key!r} must be {types[0].__name__}, got {value!r}")
    if not isinstance(value, types):
        raise FedLTError(f"config key {key!r} must be {types[0].__name__}, got {value!r}")
    return value


def _check_section(cfg: dict, defaults: dict, prefix: str = "") -> None:
    for key in cfg:
        dotted = f"{prefix}{key}"
        if key not in defaults:
            if prefix == "centralized.":
                continue  # checked against the method's options in _check_plugin_options
            raise FedLTError(f"unknown config key {dotted!r}")
        if isinstance(defaults[key], dict):
            if dotted in PLUGIN_SECTIONS or dotted == "sweep":
                continue
            _check_section(cfg[key], defaults[key], dotted + ".")
        else:
            cfg[key] = _check_type(dotted, cfg[key], defaults[key])


def _check_plugin_options(cfg: dict) -> None:
    from fedlt.registry import CENTRALIZED, CLIENTS, STRATEGIES

    strategy = STRATEGIES.get(cfg["strategy"]["name"])
    if cfg["client"]["name"] is None:
        cfg["client"]["name"] = getattr(strategy, "client", "fedavg")
    client = CLIENTS.get(cfg["client"]["name"])
    for section, plugin in (("strategy", strategy), ("client", client)):
        options = {"name": cfg[section]["name"], **getattr(plugin, "options", {})}
        given = cfg[section]
        for key in given:
            if key not in options:
                raise FedLTError(f"unknown config key '{section}.{key}' for {section} {options['name']!r}; "
                                 f"its keys: {', '.join(sorted(options))}")
        for key, default in options.items():
            if key not in given:
                given[key] = copy.deepcopy(default)
            elif default is not None:
                given[key] = _check_type(f"{section}.{key}", given[key], default)
        if hasattr(plugin, "check_options"):  # the plug-in's own ranges, as one-line FedLTErrors
            plugin.check_options(given)
    method = CENTRALIZED.get(cfg["centralized"]["method"])
    options = getattr(method, "options", {})
    for key in cfg["centralized"]:
        if key not in CENTRALIZED_FIXED and key not in options:
            raise FedLTError(f"unknown config key 'centralized.{key}' for centralized method "
                             f"{cfg['centralized']['method']!r}; its own keys: {', '.join(sorted(options)) or 'none'}")
    for key, default in options.items():
        if key not in cfg["centralized"]:
            cfg["centralized"][key] = copy.deepcopy(default)
        elif default is not None:
            cfg["centralized"][key] = _check_type(f"centralized.{key}", cfg["centralized"][key], default)


def _positive(cfg: dict, key: str, strict: bool = True) -> None:
    v = get_dotted(cfg, key)
    if v is not None and (v <= 0 if strict else v < 0):
        raise FedLTError(f"config key {key!r} must be {'>' if strict else '>='} 0, got {v}")


def validate(cfg: dict) -> dict:
    """Check every key, type and range; fill plug-in defaults. Raises :class:`FedLTError`."""
    from fedlt.registry import DATASETS, MODELS, import_plugins

    _check_section(cfg, DEFAULTS)
    import_plugins(cfg["plugins"])
    for key, choices in CHOICES.items():
        if get_dotted(cfg, key) not in choices:
            raise FedLTError(f"config key {key!r} must be one of {', '.join(choices)}, got {get_dotted(cfg, key)!r}")
    DATASETS.get(cfg["data"]["name"])
    if cfg["model"]["name"] is not None:
        MODELS.get(cfg["model"]["name"])
    if cfg["data"]["imbalance_factor"] < 1:
        raise FedLTError(f"data.imbalance_factor must be >= 1 (N_max/N_min), got {cfg['data']['imbalance_factor']}")
    if cfg["partition"]["alpha"] <= 0:
        raise FedLTError(f"partition.alpha must be > 0, got {cfg['partition']['alpha']}")
    frac = cfg["federation"]["fraction"]
    if not 0 < frac <= 1:
        raise FedLTError(f"federation.fraction must be in (0, 1], got {frac}")
    for key in ("partition.num_clients", "federation.rounds", "train.batch_size", "train.lr",
                "eval.batch_size", "centralized.epochs", "train.local_epochs", "federation.client_cpus",
                "federation.checkpoint_every", "eval.every"):
        _positive(cfg, key)
    for key in ("train.weight_decay", "train.momentum", "federation.max_failures", "data.crop_padding",
                "partition.min_size", "centralized.warmup_epochs"):
        _positive(cfg, key, strict=False)
    _check_plugin_options(cfg)
    return cfg


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
