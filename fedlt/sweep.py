"""Sweeps: a config whose ``sweep:`` mapping lists values for dotted keys runs every combination.

    sweep:
      seed: [0, 1, 2]
      partition.alpha: [0.1, 0.5]
      strategy.name: [fedavg, fedprox]

or on the command line ``sweep.seed=[0,1] sweep.partition.alpha=[0.1,0.5]``. Every combination is
resolved and validated like a plain config (``load_config`` with the values as overrides) before any
training starts. Each becomes one federated and/or one centralized run (``mode``), in a run directory
whose name holds the seed and the varied values, e.g. ``default-seed1-alpha0.1-fed-fedavg`` (the seed even
when it is not swept: ``default-seed0-fed-fedavg``; ``-fed-fedavg+la`` where the client method is not the
strategy's own, :func:`fedlt.config.federated_method`). A run's config.yaml
holds no ``sweep`` key: it is the plain config of that run.

Runs that the combinations share are run once: the centralized run ignores the federated keys
(``partition``, ``federation``, ``strategy``, ``client``) and the federated run ignores
``centralized``, so sweeping only federated keys gives one centralized run per remaining combination.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlt.config import PARTITION_KEYS, PARTITION_READS, Config, federated_method, load_config
from fedlt.errors import FedLTError

FEDERATED_ONLY = ("partition", "federation", "strategy", "client")
CENTRALIZED_ONLY = ("centralized",)
# keys of a shared section that only a federated run reads (a centralized run has no clients to evaluate or to
# train locally: its schedule is centralized.epochs, its optimiser falls back to train.lr / momentum / …)
FEDERATED_ONLY_KEYS = ("eval.local", "eval.finetune_epochs", "train.local_epochs", "train.local_steps")


def other_mode_sections(mode: str) -> tuple[str, ...]:
    """The config sections a run of ``mode`` does not depend on (the other mode's; none for another mode)."""
    return {"federated": CENTRALIZED_ONLY, "centralized": FEDERATED_ONLY}.get(mode, ())

# Short names of keys in run directory names; other keys use their last part.
SHORT = {"data.imbalance_factor": "if", "partition.num_clients": "clients", "data.name": "data",
         "model.name": "model", "strategy.name": "", "centralized.method": ""}
# Keys that the run directory's suffix (-fed-<strategy>, -cen-<method>) already names.
IN_SUFFIX = {"federated": "strategy.name", "centralized": "centralized.method"}


@dataclass
class PlannedRun:
    mode: str  # federated | centralized
    cfg: Config  # resolved config of this run (mode set, no sweep)
    path: Path
    values: dict[str, Any]  # the swept values that this run depends on


def split_overrides(overrides: list[str] | None) -> tuple[list[str], dict[str, Any]]:
    """``sweep.KEY=[..]`` items (KEY may be dotted) apart from the plain overrides."""
    from fedlt.config import parse_override

    plain, sweep, given = [], {}, {}
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if "=" in item:  # one key twice (or a key and its section): the last would win without a word
            # (`sweep={} sweep.seed=[0,1]` clears a section, then sets in it: what it says)
            twice = next((g for g in given if keys_overlap(g, key)
                          and not (key.startswith(g + ".") and given[g].partition("=")[2].strip() == "{}")), None)
            if twice is not None:
                same = "given twice" if twice == key else f"given with {twice!r}"
                raise FedLTError(f"config key {key!r} is {same} on the command line ({given[twice]!r} and {item!r}): "
                                 f"give it once")
            given[key] = item
        if item.startswith("sweep.") and "=" in item:
            key, value = parse_override(item)
            sweep[key[len("sweep."):]] = value
        else:
            plain.append(item)
    return plain, sweep


def keys_overlap(a: str, b: str) -> bool:
    """Whether dotted keys ``a`` and ``b`` name the same value, or one a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{partition: {alpha: [..]}}`` and ``{"partition.alpha": [..]}`` both -> ``{"partition.alpha": [..]}``."""
    out = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def sweep_axes(sweep: dict) -> dict[str, list]:
    """Check the sweep mapping: each key lists at least one value, none twice (a typo for another value: the
    repeat's runs were the same runs, skipped without a word)."""
    axes = flatten(sweep)
    for key, values in axes.items():
        if key == "sweep" or key.startswith("sweep."):
            raise FedLTError(f"sweep key {key!r}: a sweep cannot sweep itself")
        if not isinstance(values, list) or not values:
            raise FedLTError(f"sweep key {key!r} must list at least one value, e.g. {key}: [a, b]; got {values!r}")
        for i, v in enumerate(values):
            if any(v == w and isinstance(v, bool) == isinstance(w, bool) for w in values[:i]):
                raise FedLTError(f"sweep key {key!r} lists {v!r} twice ({values!r}): each value is one run; drop the "
                                 f"repeat or give the value you meant")
    return axes


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the value comes back with its type


def expand(path: str | Path | None, overrides: list[str] | None = None) -> list[tuple[Config, dict]]:
    """Every combination of the sweep as (resolved config without ``sweep``, {key: value}).

    A plain override of a key that the config file sweeps replaces that sweep axis (the command line wins,
    as it does for any other key); a ``sweep.KEY=[..]`` override adds or replaces an axis. A key given both as
    a plain override and by a ``sweep.KEY=[..]`` override (or a section above it) is an error: which one meant it?
    Without a sweep: one config and no values. A combination that fails validation raises a one-line
    :class:`FedLTError` naming it, before anything is run.
    """
    from fedlt.config import parse_override

    plain, cli_sweep = split_overrides(overrides)
    base = load_config(path, plain)
    axes = sweep_axes({**flatten(base.sweep), **cli_sweep})
    # a plain override of a key that the file sweeps fixes it: `strategy.name=fedlc` runs FedLC only
    fixed = {parse_override(item)[0] for item in plain}
    # ... but one that a sweep.KEY=[..] override sweeps too (or a section above it) would be replaced unseen
    both = next(((k, f) for k in cli_sweep for f in sorted(fixed) if f == k or f.startswith(k + ".")), None)
    if both:
        raise FedLTError(f"config key {both[1]!r} is given both as an override and by sweep.{both[0]}=[..], whose "
                         f"values would replace it: give one of them")
    axes = {k: v for k, v in axes.items() if k in cli_sweep or not any(k == f or k.startswith(f + ".") for f in fixed)}
    if not axes:
        return [(base.replace(sweep={}), {})]
    out, seen = [], {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        try:
            cfg = load_config(path, plain + [_override(k, v) for k, v in values.items()])
        except FedLTError as exc:
            raise FedLTError(f"sweep combination {', '.join(f'{k}={v}' for k, v in values.items())}: {exc}") from None
        cfg = cfg.replace(sweep={})
        written = ", ".join(f"{k}={v!r}" for k, v in values.items())  # repr: '1e-3' is a string, 0.001 a number
        dump = cfg.model_dump_json()
        if dump in seen:  # values that differ as written but not once validated ('1e-3' and 0.001; 1 and '1')
            raise FedLTError(f"sweep combinations {seen[dump]} and {written} are the same config once validated: "
                             f"each value is one run; drop the repeat or give the value you meant")
        seen[dump] = written
        out.append((cfg, values))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(_fmt(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+]+", "_", str(value))


def short_names(keys: list[str]) -> dict[str, str]:
    """Name of each key in run directory names; the full key (dots as _) where last parts collide."""
    last = {k: SHORT.get(k, k.split(".")[-1]) for k in keys}
    clash = {v for v in last.values() if v and list(last.values()).count(v) > 1}
    return {k: (k.replace(".", "_") if v in clash else v) for k, v in last.items()}


def run_name(name: str, mode: str, cfg: Config, values: dict[str, Any], short: dict[str, str]) -> str:
    """``<name>-seed<seed>[-<swept values>]-fed-<strategy>[+<client>]`` or ``…-cen-<method>``: the seed always (so
    runs of two seeds never share a directory), then the other swept values the run depends on."""
    parts = [name, f"seed{cfg.seed}"] + [f"{short[k]}{_fmt(v)}" for k, v in values.items()
                                         if k not in (IN_SUFFIX[mode], "seed")]
    suffix = f"fed-{_fmt(federated_method(cfg))}" if mode == "federated" else f"cen-{cfg.centralized.method}"
    return "-".join(parts + [suffix])


def unread_keys(config: dict) -> set[str]:
    """The dotted keys of a config mapping (``mode`` one run's) that its run does not read, given its other
    values: a centralized run's :data:`FEDERATED_ONLY_KEYS`, the partition keys of the other partition methods
    (:data:`PARTITION_READS`: ``partition.alpha`` under ``iid``) and ``data.imbalance_factor`` under
    ``data.profile=none`` (no long-tailed cut). Two configs that differ only there are one run: a sweep over them
    trains it once, a finished run of one is the run of the other, the report makes them one row."""
    mode, out = config.get("mode"), set()
    if mode == "centralized":
        out.update(FEDERATED_ONLY_KEYS)
    part = config.get("partition")
    if mode == "federated" and isinstance(part, dict) and part.get("method") in PARTITION_READS:
        out.update(f"partition.{k}" for k in PARTITION_KEYS if k not in PARTITION_READS[part["method"]])
    data = config.get("data")
    if isinstance(data, dict) and data.get("profile") == "none":
        out.add("data.imbalance_factor")
    return out


def without_unread(config: dict) -> dict:
    """A config mapping without what a run of its ``mode`` does not read: the other mode's sections and the keys
    of :func:`unread_keys` (``eval.local`` of a centralized run: a sweep over it trained the same centralized run
    twice, and a finished one was refused as "another config")."""
    mode = config.get("mode")
    out = {k: v for k, v in config.items() if k not in other_mode_sections(mode)}
    for key in unread_keys(config):
        section, name = key.split(".", 1)
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def _reads(read: dict, key: str) -> bool:
    """Whether the swept ``key`` is among what a run reads (``read``: its :func:`without_unread` config), so that
    its value belongs in the run directory's name."""
    section, _, rest = key.partition(".")
    return section in read and (not isinstance(read[section], dict) or rest.split(".")[0] in read[section])


MAX_DIR_NAME = 255  # bytes of one path component (ext4, XFS, APFS, NTFS)


def plan(combos: list[tuple[Config, dict]], out: str | Path) -> list[PlannedRun]:
    """The runs of the combinations, in order, each distinct run once.

    A run that several combinations share keeps the config of the first one (so a restarted sweep
    finds the same config.yaml). Two different runs that would share a directory are an error.
    """
    short = short_names(list(combos[0][1])) if combos else {}
    runs: list[PlannedRun] = []
    seen: dict[str, PlannedRun] = {}
    by_path: dict[Path, str] = {}
    for cfg, values in combos:
        if cfg.sweep:
            raise FedLTError("this config lists a sweep: expand it with fedlt.sweep.expand first")
        modes = ("federated", "centralized") if cfg.mode == "both" else (cfg.mode,)
        for mode in modes:
            c = cfg.replace(mode=mode, sweep={})
            read = without_unread(c.model_dump(mode="json"))  # what the run of ``mode`` depends on
            key = json.dumps(read, sort_keys=True)
            if key in seen:
                continue
            mine = {k: v for k, v in values.items() if _reads(read, k)}
            path = Path(out) / run_name(cfg.name, mode, c, mine, short)
            if len(path.name.encode()) > MAX_DIR_NAME:
                raise FedLTError(f"the run directory name {path.name[:60]}… is {len(path.name.encode())} bytes, over "
                                 f"the {MAX_DIR_NAME} a file system allows: shorten name "
                                 f"({len(cfg.name.encode())} bytes) or the swept values")
            if path in by_path and by_path[path] != key:
                raise FedLTError(f"two different runs of the sweep would share the run directory {path}; "
                                 f"give the swept values distinct names")
            by_path[path] = key
            seen[key] = PlannedRun(mode, c, path, mine)
            runs.append(seen[key])
    return runs


if __name__ == "__main__":  # a library module: sweeps run through fedlt.simulate
    import sys

    print("error: fedlt.sweep has no command line; run a sweep with python -m fedlt.simulate [--config FILE] "
          "sweep.KEY=[a,b] ... (or a sweep: mapping in the config file)", file=sys.stderr)
    sys.exit(2)
