"""Reading run directories: find them, read and validate their files, one-line errors for damaged ones.

A finished run directory holds config.yaml, summary.json, metrics.jsonl, partition.json and done (and
usually env.json); see :mod:`fedlt.rundir`, which writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlt.metrics import RELIABILITY_BINS
from fedlt.rundir import config_as_today, identity_digest
from fedlt.sweep import flatten, other_mode_sections

# Files every finished run directory holds; a folder holding any of them is taken for a run directory.
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "partition.json", "done")
SUMMARY_KEYS = ("mode", "method", "accuracy", "balanced_accuracy", "ece", "per_class", "train_class_counts")
# Values the report reads as numbers (JSON null: not finite, or not measured) or as one number per class.
SUMMARY_NUMBERS = ("accuracy", "balanced_accuracy", "ece", "many", "medium", "few", "local_accuracy", "prior_l1",
                   "seconds_per_round", "seconds_per_epoch", "images_per_second", "wall_clock_seconds")
SUMMARY_PER_CLASS = ("per_class", "estimated_prior", "true_prior")  # estimated_prior, true_prior: optional
ENV_TEXT = ("gpu", "device", "platform", "peak_memory_of")
# Config keys that do not change a run's result (eval.local and eval.finetune_epochs do: whether the local accuracy
# is measured, and of which personalised model).
BOOKKEEPING = ("name", "seed", "mode", "device", "eval.batch_size", "eval.every", "sweep", "plugins", "data.root",
               "data.train_list", "data.test_list", "federation.client_cpus", "federation.client_gpus",
               "federation.checkpoint_every", "federation.max_failures")
FEDERATED_EVAL = ("eval.local", "eval.finetune_epochs")  # the local evaluation: a centralized run ignores them


class RunError(Exception):
    """A run directory that cannot be read; the message is one line naming it."""


@dataclass
class Run:
    """One finished run directory, read."""

    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    partition: dict
    env: dict

    @property
    def mode(self) -> str:
        return self.summary["mode"]

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    def setting(self) -> dict[str, Any]:
        """The flattened config that decides the result, without the seed and bookkeeping. A centralized
        run ignores the federated sections (partition, federation, strategy, client), as in
        :mod:`fedlt.sweep`, and the local evaluation's keys."""
        ignored = other_mode_sections(self.mode)
        flat = flatten({k: v for k, v in self.config.items() if k not in ignored})
        return {k: v for k, v in flat.items()
                if not _bookkeeping(k) and not (self.mode == "centralized" and k in FEDERATED_EVAL)}

    def data_key(self) -> str:
        """The run's *data setting*: its ``data`` and ``model`` sections and the training set it read (as a JSON
        string). The training set is ``train images`` (:func:`train_images_text` of summary.json's class counts):
        ``data.root`` and the list files are bookkeeping (the same data on another machine), so two runs of one
        config that read different data (another root, a list file edited between runs) are told apart by it."""
        s = self.setting()
        key = {k: v for k, v in s.items() if k.startswith(("data.", "model."))}
        key["train images"] = train_images_text(self.summary["train_class_counts"])
        return json.dumps(key, sort_keys=True)


def train_images_text(counts: list[float]) -> str:
    """A training set as the report tells it apart: its size and its classes' largest and smallest counts,
    ``"14886 (6000→60)"``."""
    n = [int(c) for c in counts]
    return f"{sum(n)} ({max(n, default=0)}→{min(n, default=0)})"


def _bookkeeping(key: str) -> bool:
    return any(key == b or (b.endswith(".") and key.startswith(b)) or key.startswith(b + ".") for b in BOOKKEEPING)


class _NotStrict(ValueError):
    """NaN, Infinity or -Infinity in a run's JSON: fedlt writes strict JSON (a non-finite number as null)."""


def _strict(constant: str) -> Any:
    raise _NotStrict(constant)


def _not_strict(path: Path, where: str, constant: _NotStrict) -> RunError:
    return RunError(f"{path}: {where} holds {constant}, which is not strict JSON (fedlt writes a non-finite number "
                    f"as null)")


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text(), parse_constant=_strict)
    except _NotStrict as exc:
        raise _not_strict(path, name, exc) from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: {name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read {name} ({exc.__class__.__name__})") from None


def _number(value: Any, null: bool = True) -> bool:
    return (null and value is None) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _numbers_error(value: Any, length: int | None = None, unit: str = "classes", null: bool = True) -> str | None:
    """What keeps ``value`` from being a list of numbers (``length`` of them), or None."""
    if not isinstance(value, list):
        return f"is not a list ({_brief(value)})"
    if length is not None and len(value) != length:
        return f"has {len(value)} values for {length} {unit}"
    bad = [i for i, x in enumerate(value) if not _number(x, null)]
    return f"[{bad[0]}] is not a number ({_brief(value[bad[0]])})" if bad else None


def _content_error(summary: dict, partition: dict, env: dict) -> str | None:
    """The first value the report reads from a run's files that has the wrong type or shape, as
    ``"<file> <key> <what is wrong>"``; None if all are right (metrics.jsonl is checked in :func:`read_run`)."""
    counts = summary["train_class_counts"]
    if error := _numbers_error(counts, null=False):
        return f"summary.json train_class_counts {error}"
    for key in SUMMARY_NUMBERS:
        if not _number(summary.get(key)):
            return f"summary.json {key} is not a number ({_brief(summary[key])})"
    for key in SUMMARY_PER_CLASS:
        if key in summary and (key == "per_class" or summary[key] is not None):
            if error := _numbers_error(summary[key], len(counts)):
                return f"summary.json {key} {error}"
    bins = summary.get("reliability")
    if isinstance(bins, dict) and "count" in bins:  # (without bin counts the report leaves the diagram out)
        n_bins = RELIABILITY_BINS  # every run's: the report pools the bins of a row's seeds
        for key in ("count", "accuracy", "confidence"):
            if error := _numbers_error(bins.get(key), n_bins, "bins", null=key != "count"):
                return f"summary.json reliability.{key} {error}"
    clients = partition["client_class_counts"]
    if not isinstance(clients, list) or not clients:
        return f"partition.json client_class_counts is not a list of clients ({_brief(clients)})"
    for i, row in enumerate(clients):
        if error := _numbers_error(row, len(counts), null=False):
            return f"partition.json client_class_counts[{i}] {error}"
    if partition.get("train_class_counts") is not None:
        if error := _numbers_error(partition["train_class_counts"], null=False):
            return f"partition.json train_class_counts {error}"
    for key in ENV_TEXT:
        if env.get(key) is not None and not isinstance(env[key], str):
            return f"env.json {key} is not a string ({_brief(env[key])})"
    if not _number(env.get("peak_memory_mib")):
        return f"env.json peak_memory_mib is not a number ({_brief(env['peak_memory_mib'])})"
    return None


def read_run(path: str | Path) -> Run:
    """Read one finished run directory; a missing or corrupt file, or a value of the wrong type or shape,
    raises :class:`RunError` naming the run and the file."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory")
    missing = [n for n in RUN_FILES if not (path / n).is_file()]
    if missing:
        what = "unfinished run (no 'done' file)" if missing == ["done"] else f"missing {', '.join(missing)}"
        raise RunError(f"{path}: {what}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: config.yaml is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise RunError(f"{path}: config.yaml does not hold a mapping")
    summary = _read_json(path, "summary.json")
    if not isinstance(summary, dict) or any(k not in summary for k in SUMMARY_KEYS):
        lacks = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
        raise RunError(f"{path}: summary.json lacks {', '.join(lacks)}")
    if summary["mode"] not in ("federated", "centralized"):
        raise RunError(f"{path}: summary.json has unknown mode {summary['mode']!r}")
    if summary.get("config_digest") not in (None, identity_digest(config)):
        raise RunError(f"{path}: config.yaml was changed or damaged after the run finished (its digest is not the "
                       f"one in summary.json), so it no longer says which config the results are of; restore it")
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read metrics.jsonl ({exc.__class__.__name__})") from None
    metrics = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line, parse_constant=_strict)
            except _NotStrict as exc:
                raise _not_strict(path, f"metrics.jsonl line {i}", exc) from None
            except json.JSONDecodeError:
                raise RunError(f"{path}: metrics.jsonl line {i} is not valid JSON") from None
            if not isinstance(row, dict):
                raise RunError(f"{path}: metrics.jsonl line {i} is not a JSON object ({_brief(row)})")
            for key, null in (("round", False), ("epoch", False), ("accuracy", True)):
                if key in row and not _number(row[key], null):
                    raise RunError(f"{path}: metrics.jsonl line {i} {key} is not a number ({_brief(row[key])})")
            metrics.append(row)
    partition = _read_json(path, "partition.json")
    if not isinstance(partition, dict) or "client_class_counts" not in partition:
        raise RunError(f"{path}: partition.json lacks client_class_counts")
    env = _read_json(path, "env.json") if (path / "env.json").is_file() else {}
    if not isinstance(env, dict):
        raise RunError(f"{path}: env.json does not hold a JSON object ({_brief(env)})")
    if error := _content_error(summary, partition, env):
        raise RunError(f"{path}: {error}")
    return Run(path, config_as_today(path / "config.yaml", config), summary, metrics, partition, env)


def find_run_dirs(path: str | Path) -> list[Path]:
    """``path`` itself if it is a run directory, else the run directories below it (sorted)."""
    path = Path(path)
    if any((path / m).exists() for m in RUN_FILES):
        return [path]
    if path.is_file():
        raise RunError(f"{path}: a file; give the run directory that holds it, or a folder of runs")
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory or folder")
    found = sorted({p.parent for m in RUN_FILES for p in path.rglob(m)})
    # a run directory's own subfolders are not runs
    found = [p for p in found if not any(q != p and q in p.parents for q in found)]
    if not found:
        raise RunError(f"{path}: holds no run directories")
    return found


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[str]]:
    """All readable runs under ``paths`` and a one-line error for each unreadable one."""
    runs, errors, seen = [], [], set()
    for p in paths:
        try:
            dirs = find_run_dirs(p)
        except RunError as exc:
            errors.append(str(exc))
            continue
        for d in dirs:
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            try:
                runs.append(read_run(d))
            except RunError as exc:
                errors.append(str(exc))
    return runs, errors
