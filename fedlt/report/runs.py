"""Reading run directories: find them, read and validate their files, one-line errors for damaged ones.

A finished run directory holds config.yaml, summary.json, metrics.jsonl, partition.json and done (and
usually env.json); see :mod:`fedlt.rundir`, which writes them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlt.metrics import RELIABILITY_BINS
from fedlt.rundir import config_as_today, identity_digest
from fedlt.sweep import flatten, without_unread

# Files every finished run directory holds.
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "partition.json", "done")
RUN_MARKERS = RUN_FILES[1:]  # what makes a folder a run directory: config.yaml alone may be a config beside runs
SUMMARY_KEYS = ("mode", "method", "accuracy", "balanced_accuracy", "ece", "per_class", "train_class_counts")
# What each value the report reads must be (:func:`_value_error`); a key not in the file is not checked (those of
# SUMMARY_KEYS are required). fraction: a number in [0, 1] (accuracies and ECE are stored as fractions) or null
# (not finite, or not measured); amount: a number ≥ 0 or null; count: a whole number ≥ 0; text: a string; note: a
# string or null.
SUMMARY_VALUES = {"method": "text", "group_rule": "text", "seed": "count",
                  **dict.fromkeys(("accuracy", "balanced_accuracy", "ece", "many", "medium", "few", "local_accuracy"),
                                  "fraction"),
                  **dict.fromkeys(("prior_l1", "seconds_per_round", "seconds_per_epoch", "images_per_second",
                                   "wall_clock_seconds"), "amount")}
# Lists of one value per class (pi_hat: the estimated prior, true_prior: optional; an estimate may be off the simplex).
SUMMARY_PER_CLASS = {"per_class": "fraction", "pi_hat": "number", "true_prior": "number"}
RELIABILITY_VALUES = {"count": "count", "accuracy": "fraction", "confidence": "fraction"}
METRICS_VALUES = {"round": "count", "epoch": "count", "accuracy": "fraction"}  # of a metrics.jsonl row
ENV_VALUES = {**dict.fromkeys(("gpu", "device", "platform", "peak_memory_of", "torch", "flwr"), "note"),
              "cpu_threads": "count", "peak_memory_mib": "amount"}
# Config keys that do not change a run's result (eval.local and eval.finetune_epochs do: whether the local accuracy
# is measured, and of which personalised model). data.root and the list files name where the data lies; the data
# itself is told apart by the training and test class counts the run recorded (Run.data_key).
BOOKKEEPING = ("name", "seed", "mode", "device", "eval.batch_size", "eval.every", "sweep", "plugins", "data.root",
               "data.train_list", "data.test_list", "data.cache", "data.cache_dir", "federation.client_cpus",
               "federation.client_gpus", "federation.checkpoint_every", "federation.max_failures",
               "federation.discovery_timeout")


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
        """The flattened config that decides the result, without the seed, bookkeeping and what the run does not
        read (:func:`fedlt.sweep.without_unread`: a centralized run ignores the federated sections and keys, an IID
        partition its α, ``data.profile=none`` its β), so that runs differing only there are one row."""
        flat = flatten(without_unread({**self.config, "mode": self.mode}))
        return {k: v for k, v in flat.items() if not _bookkeeping(k)}

    def data_key(self) -> str:
        """The run's *data setting*: its ``data`` and ``model`` sections and the training and test sets it read (as
        a JSON string). The training set is ``train images`` (:func:`images_text` of summary.json's class counts),
        the test set ``test images`` (of partition.json's; None for a run that did not record them): ``data.root``
        and the list files are bookkeeping (the same data on another machine), so two runs of one config that read
        different data (another root, a list file edited between runs, another test list) are told apart by
        them, and are neither averaged nor compared with each other; two lists of the same class counts by
        :meth:`digest` (``test set digest``, ``train set digest``, where the run recorded one)."""
        s = self.setting()
        key = {k: v for k, v in s.items() if k.startswith(("data.", "model."))}
        key["train images"] = images_text(self.summary["train_class_counts"])
        key["test images"] = images_text(self.test_class_counts)
        for split in ("train", "test"):
            if (digest := self.digest(split)) is not None:
                key[f"{split} set digest"] = digest
        return json.dumps(key, sort_keys=True)

    def digest(self, split: str) -> str | None:
        """The digest of a split's labels and images (summary.json's ``data_fingerprint``, written since fedlt
        records it; None before), where it is the same for every seed of a config: two test lists, or two
        already long-tailed training lists (``data.profile=none``), of the same class counts are told apart by it.
        A training set cut long-tailed has none here: its subset is drawn from the seed."""
        fingerprint = self.summary.get("data_fingerprint")
        data = self.config.get("data")  # (config.yaml's section: the whole setting need not be built for it)
        profile = data.get("profile") if isinstance(data, dict) else None
        if not isinstance(fingerprint, dict) or (split == "train" and profile != "none"):
            return None
        return fingerprint[split]["digest"]

    @property
    def test_class_counts(self) -> list[int] | None:
        """Test images of each class (partition.json); None where the run did not record them."""
        return self.partition.get("test_class_counts")


def images_text(counts: list[int] | None) -> str | None:
    """A training or test set as the report tells it apart: its size and its classes' largest and smallest
    counts, ``"14886 (6000→60)"``; None for None."""
    if counts is None:
        return None
    return f"{sum(counts)} ({max(counts, default=0)}→{min(counts, default=0)})"


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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value_error(value: Any, kind: str) -> str | None:
    """What keeps ``value`` from being of ``kind`` (``fraction``, ``amount``, ``number``, ``count``, ``text`` or
    ``note``: see :data:`SUMMARY_VALUES`), or None. A wrong value the report would show as if measured (a negative
    count, an accuracy of 3) or crash on (a fractional round, a list for a seed) is refused here, not drawn."""
    if value is None and kind not in ("count", "text"):
        return None
    if kind in ("text", "note"):
        return None if isinstance(value, str) else f"is not a string ({_brief(value)})"
    if not _number(value):
        return f"is not a number ({_brief(value)})"
    if kind == "count" and (not isinstance(value, int) or value < 0):
        return f"is not a whole number ≥ 0 ({_brief(value)})"
    if kind == "fraction" and not 0 <= value <= 1:
        return f"is not in [0, 1] ({_brief(value)})"
    if kind == "amount" and value < 0:
        return f"is negative ({_brief(value)})"
    return None


def _values_error(values: dict, kinds: dict[str, str], where: str) -> str | None:
    """The first of ``values``' keys named in ``kinds`` whose value is not of its kind, as ``"<where> <key> <what
    is wrong>"``; None if all are right (keys not in ``values`` are not checked)."""
    for key, kind in kinds.items():
        if key in values and (error := _value_error(values[key], kind)):
            return f"{where} {key} {error}"
    return None


def _list_error(value: Any, kind: str, length: int | None = None, unit: str = "classes") -> str | None:
    """What keeps ``value`` from being a list of values of ``kind`` (``length`` of them), or None; as text to
    follow the list's name: ``" has 2 values for 10 classes"``, ``"[3] is not a whole number ≥ 0 (-5)"``."""
    if not isinstance(value, list):
        return f" is not a list ({_brief(value)})"
    if length is not None and len(value) != length:
        return f" has {len(value)} values for {length} {unit}"
    return next((f"[{i}] {error}" for i, x in enumerate(value) if (error := _value_error(x, kind))), None)


def _fingerprint_error(fingerprint: Any) -> str | None:
    """What keeps summary.json's ``data_fingerprint`` (absent or null in a run of an earlier fedlt) from being
    ``{"train": {"images": N, "digest": hex}, "test": {...}}``, as text to follow its name; None if it is."""
    if fingerprint is None:
        return None
    if not isinstance(fingerprint, dict):
        return f" is not a mapping ({_brief(fingerprint)})"
    for split in ("train", "test"):
        value = fingerprint.get(split)
        if not isinstance(value, dict):
            return f".{split} is not a mapping ({_brief(value)})"
        if error := _value_error(value.get("images"), "count"):
            return f".{split}.images {error}"
        digest = value.get("digest")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{16}", digest):
            return f".{split}.digest is not 16 hex digits ({_brief(digest)})"
    return None


def _failures_error(failures: Any) -> str | None:
    """What keeps a federated run's ``failures`` (absent in a centralized run) from being ``{"total": n,
    "per_round": [n per round], "setup": n}`` of whole numbers ≥ 0, as text to follow its name; None if it is."""
    if failures is None:
        return None
    if not isinstance(failures, dict):
        return f" is not a mapping ({_brief(failures)})"
    if error := _values_error(failures, {"total": "count", "setup": "count"}, ""):
        return f".{error.strip()}"
    if "per_round" in failures and (error := _list_error(failures["per_round"], "count", unit="rounds")):
        return f".per_round{error}"
    return None


def _content_error(summary: dict, partition: dict, env: dict) -> str | None:
    """The first value the report reads from a run's summary.json, partition.json and env.json that has the wrong
    type, range or shape, as ``"<file> <key> <what is wrong>"``; None if all are right (metrics.jsonl's rows are
    checked as they are read, :func:`_metrics_row`)."""
    counts = summary["train_class_counts"]
    if error := _list_error(counts, "count"):
        return f"summary.json train_class_counts{error}"
    if not sum(counts):
        return f"summary.json train_class_counts holds no training image ({_brief(counts)})"
    if error := _values_error(summary, SUMMARY_VALUES, "summary.json"):
        return error
    for key, kind in SUMMARY_PER_CLASS.items():
        present = key == "per_class" or summary.get(key) is not None  # (the priors: null or left out if not estimated)
        if present and (error := _list_error(summary[key], kind, len(counts))):
            return f"summary.json {key}{error}"
    bins = summary.get("reliability")
    if isinstance(bins, dict) and "count" in bins:  # (without bin counts the report leaves the diagram out)
        for key, kind in RELIABILITY_VALUES.items():  # every run's RELIABILITY_BINS: a row's seeds' bins are pooled
            if error := _list_error(bins.get(key), kind, RELIABILITY_BINS, "bins"):
                return f"summary.json reliability.{key}{error}"
    if error := _fingerprint_error(summary.get("data_fingerprint")):
        return f"summary.json data_fingerprint{error}"
    if error := _failures_error(summary.get("failures")):
        return f"summary.json failures{error}"
    clients = partition["client_class_counts"]
    if not isinstance(clients, list) or not clients:
        return f"partition.json client_class_counts is not a list of clients ({_brief(clients)})"
    for i, row in enumerate(clients):
        if error := _list_error(row, "count", len(counts)):
            return f"partition.json client_class_counts[{i}]{error}"
    for key, length in (("train_class_counts", None), ("test_class_counts", len(counts))):
        if partition.get(key) is not None and (error := _list_error(partition[key], "count", length)):
            return f"partition.json {key}{error}"
    return _values_error(env, ENV_VALUES, "env.json")


def _metrics_row(path: Path, i: int, line: str) -> dict:
    """Line ``i`` of metrics.jsonl as a dict; :class:`RunError` where it is not a JSON object whose round, epoch
    and accuracy are of :data:`METRICS_VALUES`' kinds."""
    try:
        row = json.loads(line, parse_constant=_strict)
    except _NotStrict as exc:
        raise _not_strict(path, f"metrics.jsonl line {i}", exc) from None
    except json.JSONDecodeError:
        raise RunError(f"{path}: metrics.jsonl line {i} is not valid JSON") from None
    if not isinstance(row, dict):
        raise RunError(f"{path}: metrics.jsonl line {i} is not a JSON object ({_brief(row)})")
    if error := _values_error(row, METRICS_VALUES, f"metrics.jsonl line {i}"):
        raise RunError(f"{path}: {error}")
    return row


def _curve_error(rows: list[dict], unit: str) -> str | None:
    """What keeps metrics.jsonl's ``rows`` from being a run's curve, or None: every row names its ``unit``
    (round or epoch) once (a resumed run's rows after its checkpoint are cut before it goes on, so a step twice is
    a damaged or concatenated file), and at least one row holds an accuracy (the last step is always evaluated)."""
    seen: dict[int, int] = {}
    for i, row in enumerate(rows, 1):
        step = row.get(unit)
        if step is None:
            return f"row {i} has no {unit}"
        if step in seen:
            return f"has {unit} {step} twice (rows {seen[step]} and {i})"
        seen[step] = i
    if not any(row.get("accuracy") is not None for row in rows):
        return "holds no accuracy (no evaluated step)"
    return None


def _cut_short(rows: list[dict], unit: str, summary: dict) -> str | None:
    """Where metrics.jsonl ends before the finished run's last round or epoch (summary.json's ``rounds``, or
    ``pretrain_epochs`` + ⌈``epochs``⌉ + ``stage2_epochs`` as the run counts them): the file was cut or
    damaged after the run, and the curve would stop there while the table showed the final numbers."""
    try:
        last = (int(summary["rounds"]) if unit == "round" else
                int(summary.get("pretrain_epochs") or 0) + math.ceil(summary["epochs"])
                + int(summary.get("stage2_epochs") or 0))
    except (KeyError, TypeError, ValueError):
        return None  # (a run written before fedlt recorded these)
    end = max(row[unit] for row in rows)
    return f"ends at {unit} {end} of the run's {last} (cut short after the run): restore it" if end < last else None


def read_run(path: str | Path) -> Run:
    """Read one finished run directory; a missing or corrupt file, or a value of the wrong type or shape,
    raises :class:`RunError` naming the run and the file."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory")
    missing = [n for n in RUN_FILES if not (path / n).is_file()]
    if "done" in missing:  # (a run writes summary.json, then done: a run without done did not finish)
        raise RunError(f"{path}: unfinished run (no 'done' file: stopped, failed, or still running)")
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)}")
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
    metrics = [_metrics_row(path, i, line) for i, line in enumerate(lines, 1) if line.strip()]
    unit = "round" if summary["mode"] == "federated" else "epoch"
    if error := _curve_error(metrics, unit) or _cut_short(metrics, unit, summary):
        raise RunError(f"{path}: metrics.jsonl {error}")
    partition = _read_json(path, "partition.json")
    if not isinstance(partition, dict) or "client_class_counts" not in partition:
        raise RunError(f"{path}: partition.json lacks client_class_counts")
    env = _read_json(path, "env.json") if (path / "env.json").is_file() else {}
    if not isinstance(env, dict):
        raise RunError(f"{path}: env.json does not hold a JSON object ({_brief(env)})")
    if error := _content_error(summary, partition, env):
        raise RunError(f"{path}: {error}")
    run = Run(path, config_as_today(path / "config.yaml", config), summary, metrics, partition, env)
    if "seed" not in summary and (error := _value_error(run.seed, "count")):  # (summary.json's: checked above)
        raise RunError(f"{path}: config.yaml seed {error}")
    return run


def find_run_dirs(path: str | Path) -> list[Path]:
    """``path`` itself if it is a run directory, else the run directories below it (sorted). A folder is taken
    for a run directory when it holds one of :data:`RUN_FILES` other than config.yaml (a run writes partition.json
    as it starts): a folder of runs that also holds the config they ran (``--config exp/config.yaml --out exp``)
    is a folder of runs."""
    path = Path(path)
    if _holds_a_run(path):
        return [path]
    if path.is_file():
        raise RunError(f"{path}: a file; give the run directory that holds it, or a folder of runs")
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory or folder")
    found = sorted({p.parent for m in RUN_MARKERS for p in path.rglob(m)})
    # a run directory's own subfolders are not runs
    found = [p for p in found if not any(q != p and q in p.parents for q in found)]
    if not found:
        raise RunError(f"{path}: holds no run directories")
    return found


def _holds_a_run(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory (as :func:`find_run_dirs` tells one) that ``path`` is or lies in, or None: where ``--out``
    or a report folder must not go (run directories inside a run, or a report among a run's own files)."""
    return next((p for p in (Path(path).absolute(), *Path(path).absolute().parents) if _holds_a_run(p)), None)


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
