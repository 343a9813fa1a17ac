"""The run directory: everything needed to trust and redo one run.

config.yaml (resolved), env.json, partition.json, metrics.jsonl (one line per round / epoch),
summary.json (final metrics), checkpoint.pt (resumable state), done (written last), .lock (held by the
run that writes the directory). Where the
``tensorboard`` package is installed (``pip install fedlt[tensorboard]``), the numbers of metrics.jsonl
also go to a TensorBoard event file (events.out.tfevents.*) in the same folder, so that
``tensorboard --logdir runs`` shows every run's curves.

Nothing is lost or mixed:

- one run at a time: a run holds an exclusive ``fcntl.flock`` on ``.lock`` while it writes the directory
  (:meth:`RunDir.lock`); a second run on the same directory fails at once with a one-line error (or waits);
- a directory that holds a run of another config is never reset: :meth:`RunDir.check_config` refuses it
  with a one-line error naming the first differing key; only :meth:`RunDir.clear` (``--overwrite``) empties it;
- every file is written whole or not at all: written to ``<name>.tmp``, flushed to disk (``fsync``) and renamed
  over the old one (``os.replace``); metrics.jsonl too: each row rewrites the whole file that way, so a
  crash leaves the rows before it, never half a line;
- JSON files are strict JSON (``allow_nan=False``): a NaN or infinite number is written as null and the
  keys it stood at are listed under ``"non_finite"`` in the same object (with a warning on stdout).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
from collections.abc import Callable, Iterator
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedlt.config import dump_config, load_config
from fedlt.errors import FedLTError

LOCK = ".lock"
RESULTS = ("metrics.jsonl", "summary.json", "checkpoint.pt", "done")  # what a fresh start removes
RECORDS = ("config.yaml", "env.json", "partition.json")  # what --overwrite removes besides
# What every summary.json holds and the command's table reads; the metrics a number or null.
SUMMARY_KEYS = ("mode", "method", "group_rule")
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "many", "medium", "few", "ece")
_held: dict[str, list] = {}  # run directory (resolved) -> [open lock file, depth]: the locks this process holds


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


class WriteFailed(FedLTError, OSError):
    """A run file could not be written (a full disk, a folder that became read-only): one line naming it. The
    files written before are whole (every write is atomic), so the same command resumes once it is fixed."""


@contextlib.contextmanager
def _writing(path: Path, tmp: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` (through ``tmp``) into :class:`WriteFailed`; nothing half-written stays."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save on a full disk raises RuntimeError
        if isinstance(exc, FedLTError):
            raise
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WriteFailed(f"cannot write {path} ({reason}); the run's files written before are whole: fix the "
                          f"disk or folder and run the same command again to resume") from None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: into ``<path>.tmp``, fsync, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def finite_json(obj: Any) -> tuple[Any, list[str]]:
    """``obj`` as plain JSON data (numpy and torch values converted) with every NaN / ±inf replaced by None,
    and the dotted keys where they were (``per_class.3``)."""
    bad: list[str] = []

    def clean(o: Any, where: str) -> Any:
        if isinstance(o, (np.ndarray, torch.Tensor, np.integer, np.floating)):
            o = _json_default(o)
        if isinstance(o, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(o)]
        if isinstance(o, float) and not math.isfinite(o):
            bad.append(where)
            return None
        return o

    return clean(obj, ""), bad


def strict_dumps(obj: Any, what: str, indent: int | None = None) -> str:
    """Strict JSON of ``obj`` (an object): non-finite numbers as null, listed under ``non_finite``."""
    data, bad = finite_json(obj)
    if bad:
        data["non_finite"] = bad
        print(f"warning: {what}: non-finite values written as null at {', '.join(bad)}", flush=True)
    return json.dumps(data, indent=indent, allow_nan=False, default=_json_default)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, strict_dumps(obj, str(path), indent=1))


def _flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(mapping, dict):
        return {prefix or "(top level)": mapping}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        out.update(_flatten(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value})
    return out


def first_difference(old: Any, new: Any) -> str:
    """``key: A there, B now`` for the first dotted key (in the new config's order) whose value differs."""
    a, b = _flatten(old), _flatten(new)
    for key in list(b) + [k for k in a if k not in b]:
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            return f"{key}: {a.get(key, '<unset>')!r} there, {b.get(key, '<unset>')!r} now"
    return "the same keys and values, written differently"


def _summary_writer(path: Path, purge_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``path``, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)  # made by the first write or lock: reading a RunDir leaves no empty folder
        self._board: Any = None  # the SummaryWriter, opened by the first metrics row; False: no tensorboard
        self._purge_step: int | None = None  # set by truncate_metrics

    @property
    def done(self) -> bool:
        return (self.path / "summary.json").is_file() and (self.path / "done").is_file()

    @contextlib.contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        """Hold the directory's lock (``fcntl.flock`` on ``.lock``, exclusive) for the block. Held by another
        process: a one-line :class:`FedLTError` at once, or (``wait``) block until it is free. Re-entrant
        within one process (the command line and the run skeleton both take it)."""
        key = str(self.path.resolve())
        if key in _held:
            _held[key][1] += 1
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(self.path / LOCK, "a+")  # noqa: SIM115 (open while the lock is held, past this block)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise FedLTError(f"run directory {self.path} is in use by another run (process {holder}); "
                                     f"wait for it to end (--wait), or choose another --out or name=") from None
                raise
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            _held[key] = [f, 1]
        try:
            yield
        finally:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                _held.pop(key)[0].close()  # closing the file releases the lock

    def write_config(self, cfg: dict) -> None:
        write_atomic(self.path / "config.yaml", dump_config(cfg))

    def same_config(self, cfg: Any) -> bool:
        """Whether config.yaml holds a run of ``cfg``: the same keys that the run's mode depends on
        (:func:`run_identity`; a centralized run does not depend on the federated sections)."""
        if not (self.path / "config.yaml").is_file() or self.config_changed_after_finishing():
            return False
        recorded, wanted = self._identities(cfg)
        return recorded == wanted

    def resumes(self, cfg: Any) -> bool:
        """Whether a run of ``cfg`` here would resume from a checkpoint: checkpoint.pt beside a config.yaml of
        ``cfg`` (:meth:`same_config`), the run not finished."""
        return (self.path / "checkpoint.pt").is_file() and not self.done and self.same_config(cfg)

    def recorded_config(self) -> dict | None:
        """config.yaml's mapping as the run wrote it; None where it is missing or not a readable mapping."""
        try:
            old = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return old if isinstance(old, dict) else None

    def _identities(self, cfg: Any) -> tuple[dict | None, dict]:
        """:func:`run_identity` of config.yaml (None where it cannot be read as a mapping) and of ``cfg``
        written as config.yaml would be. config.yaml is read through today's config schema where it still
        validates, so that a key added to fedlt after the run (at its default) is not a difference."""
        from fedlt.sweep import without_unread

        old = self.recorded_config()
        wanted = without_unread(run_identity(yaml.safe_load(dump_config(cfg))))
        if old is None:
            return None, wanted
        return without_unread(run_identity(config_as_today(self.path / "config.yaml", old))), wanted

    def config_digest(self) -> str:
        """:func:`identity_digest` of config.yaml as the run wrote it: what its checkpoints record."""
        return identity_digest(self.recorded_config() or {})

    def config_changed_after_finishing(self) -> bool:
        """Whether config.yaml is no longer the one the finished run recorded in summary.json (``config_digest``,
        written since fedlt records it): edited, or truncated where what is left still validates and would read
        as another config, with defaults in place of the lost keys."""
        try:
            recorded = json.loads((self.path / "summary.json").read_text(encoding="utf-8")).get("config_digest")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            return False  # (an unreadable summary.json is refused where it is read)
        return self.done and recorded is not None and recorded != self.config_digest()

    def config_conflict(self, cfg: Any) -> str | None:
        """None where this directory holds no run or a run of ``cfg``; else why it cannot be reused, in a
        line naming the directory and the first key (of the resolved config.yaml) that differs, or saying that
        its config.yaml is missing or unreadable (a run's results are never replaced without --overwrite)."""
        state = "a finished" if self.done else "an unfinished"
        if not (self.path / "config.yaml").is_file():
            results = [name for name in RESULTS if (self.path / name).is_file()]
            if not results:
                return None
            return (f"run directory {self.path} holds {state} run ({', '.join(results)}) but no config.yaml that "
                    f"says which config it ran; pass --overwrite to replace it, or choose another --out or name=")
        recorded, wanted = self._identities(cfg)
        if recorded is None:
            return (f"run directory {self.path} holds {state} run whose config.yaml is not a readable config "
                    f"mapping; pass --overwrite to replace it, or choose another --out or name=")
        if self.config_changed_after_finishing():
            return (f"run directory {self.path} holds a finished run whose config.yaml was changed or damaged after "
                    f"it finished (its digest is not the one in summary.json); restore it, or pass --overwrite to "
                    f"replace the run, or choose another --out or name=")
        if recorded == wanted:
            return None
        diff = first_difference(recorded, wanted)
        return (f"run directory {self.path} holds {state} run of another config ({diff}); "
                f"pass --overwrite to replace it, or choose another --out or name=")

    def check_config(self, cfg: Any) -> None:
        """Raise :meth:`config_conflict` as a :class:`FedLTError` (nothing is deleted without --overwrite)."""
        conflict = self.config_conflict(cfg)
        if conflict:
            raise FedLTError(conflict)

    def write_env(self, env: dict) -> None:
        write_json(self.path / "env.json", env)

    def update_env(self, extra: dict) -> None:
        """Add ``extra`` to env.json (what is known only at the end of a run, e.g. the peak memory). One damaged
        since the run started is set aside first (:meth:`check_env`): the run's summary is still written."""
        self.check_env()
        f = self.path / "env.json"
        write_json(f, {**(json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}), **extra})

    def env_problem(self) -> str | None:
        """Why env.json cannot be added to (unreadable, not UTF-8, not JSON, not a JSON object); None where it can,
        or where there is none."""
        f = self.path / "env.json"
        if not f.exists():
            return None
        try:
            env = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            what = {json.JSONDecodeError: "not JSON", UnicodeDecodeError: "not UTF-8 text"}.get(type(exc), "unreadable")
            return f"{what}: {reason}"[:200]
        return None if isinstance(env, dict) else f"a JSON {type(env).__name__}, not an object"

    def check_env(self, current: Callable[[], dict] = dict) -> None:
        """Where env.json is damaged (:meth:`env_problem`), set it aside as env.json.damaged (``.2``, ``.3`` … next
        to an earlier one, never over it), write env.json again with ``current()`` (a resumed run: the environment
        of this process) and a ``note`` saying so, and print a warning naming both files. A resumed run calls it
        before it trains, since :meth:`update_env` adds the peak memory to env.json at the end.

        Why not refuse the run: env.json is a record (versions, hardware, peak memory) that neither the
        checkpoint nor the results depend on, and that nothing can rebuild; refusing would leave the researcher
        to delete it by hand to go on, and failing at the end lost the summary of the training just done.
        Why not overwrite it: what is left of it may still say what the run started on."""
        problem = self.env_problem()
        if problem is None:
            return
        f = self.path / "env.json"
        aside = _free_name(f.with_name("env.json.damaged"))
        try:
            os.replace(f, aside)
        except OSError as exc:
            raise FedLTError(f"run {self.path}: env.json is damaged ({problem}) and cannot be set aside as "
                             f"{aside.name} ({exc.strerror or exc}); move or delete it, then run the same command "
                             f"again to resume") from None
        env = current()
        write_json(f, {**env, "note": f"written again: the env.json before it was damaged ({problem}) and is set "
                                      f"aside as {aside.name}"})
        print(f"warning: {f} is damaged ({problem}); set aside as {aside.name} and written again"
              f"{' with the environment of this process' if env else ''}", flush=True)

    def write_partition(self, counts: np.ndarray, train_counts: np.ndarray, test_counts: np.ndarray,
                        method: str, local_test: tuple[np.ndarray, list[np.ndarray]] | None = None) -> None:
        """partition.json; with ``local_test`` (client × class counts, per-client test indices) also the local
        test sets of the personalised evaluation (:mod:`fedlt.federation.local_eval`)."""
        record = {"method": method, "num_clients": int(counts.shape[0]),
                  "train_class_counts": train_counts, "test_class_counts": test_counts,
                  "client_sizes": counts.sum(1), "client_class_counts": counts}
        if local_test is not None:
            record["local_test_class_counts"] = local_test[0]
            record["local_test_indices"] = [np.asarray(i).tolist() for i in local_test[1]]
        write_json(self.path / "partition.json", record)

    def append_metrics(self, row: dict) -> None:
        """Append ``row`` to metrics.jsonl and, where tensorboard is installed, its numbers to the event file:
        one scalar per key (``accuracy``, ``few``, ``train_loss``, ``seconds`` …) at the step ``row["round"]``
        (federated) or ``row["epoch"]`` (centralized); None, lists and strings are left out."""
        f = self.path / "metrics.jsonl"
        old = f.read_text() if f.is_file() else ""
        write_atomic(f, old + strict_dumps(row, f"{f} row {row.get('round', row.get('epoch'))}") + "\n")
        step = row.get("round", row.get("epoch"))
        if step is None:
            return
        if self._board is None:
            self._board = _summary_writer(self.path, self._purge_step) or False
        if self._board:
            for key, value in row.items():
                if key not in ("round", "epoch") and isinstance(value, Real) and not isinstance(value, bool):
                    self._board.add_scalar(key, float(value), int(step))
            self._board.flush()

    def truncate_metrics(self, key: str, last: int) -> None:
        """Keep only rows with ``row[key] <= last`` (after resuming from a checkpoint).

        TensorBoard: event files are append-only, so the rows after ``last`` that the interrupted run
        logged stay in its event file. The event file of the resumed run starts with a purge at step
        ``last + 1`` (``SummaryWriter(purge_step=last + 1)``): TensorBoard drops the earlier files' points
        from that step on and shows each step once, with the resumed run's value."""
        f = self.path / "metrics.jsonl"
        rows = [r for r in self._metric_rows(key) if r[key] <= last]
        have = [r[key] for r in rows]
        if have != list(range(last + 1)):  # rows lost or damaged since: the curve cannot be resumed
            shown = f"{key}s {have[0]}..{have[-1]} of them" if have else "no row"
            raise FedLTError(f"run {self.path}: metrics.jsonl holds {len(have)} rows ({shown}) before the "
                             f"checkpoint after {key} {last}, not one per {key} 0..{last}: delete the run folder "
                             f"to run it over")
        write_atomic(f, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        self._close_board()
        self._purge_step = last + 1

    def _metric_rows(self, key: str) -> list[dict]:
        """metrics.jsonl's rows (each written whole, atomically); a line that is not a row with ``key`` (damage
        from outside) is a one-line :class:`FedLTError` naming it."""
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return []
        rows = []
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get(key), int):
                raise FedLTError(f"run {self.path}: metrics.jsonl line {i} is not a row with its {key} "
                                 f"({line[:40]!r}): delete the run folder to run it over")
            rows.append(row)
        return rows

    def _close_board(self) -> None:
        if self._board:
            self._board.close()
        self._board = None

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)
        write_atomic(self.path / "done", "")
        self._close_board()

    def read_summary(self) -> dict:
        """summary.json of a finished run. A file that cannot be read (truncated, not JSON, not an object, without
        the keys every summary holds) is a one-line :class:`FedLTError` naming it and what to do."""
        f = self.path / "summary.json"
        try:
            summary = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = (str(exc).splitlines() or [type(exc).__name__])[0]
        else:
            problem = _summary_problem(summary)
        if problem:
            raise FedLTError(f"run {self.path}: summary.json is not readable ({problem}); delete it to finish the "
                             f"run again from its checkpoint, or delete the run folder to run it over")
        return summary

    def save_checkpoint(self, state: dict) -> None:
        """Write ``state`` atomically to checkpoint.pt. It must hold only tensors and plain Python values
        (:func:`check_plain`), so that :meth:`load_checkpoint` can read it with ``weights_only=True``."""
        check_plain(state, "checkpoint")
        tmp = self.path / "checkpoint.pt.tmp"
        with _writing(self.path / "checkpoint.pt", tmp):
            self.path.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            os.replace(tmp, self.path / "checkpoint.pt")

    def load_checkpoint(self) -> dict | None:
        """checkpoint.pt, or None where there is none. Read with ``torch.load(..., weights_only=True)``: tensors
        and plain Python values only, so a replaced checkpoint cannot run code. A file that cannot be read so
        (truncated, corrupt, or holding other objects) is a one-line :class:`FedLTError`."""
        f = self.path / "checkpoint.pt"
        if not f.is_file():
            return None
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = next((line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
            raise FedLTError(f"checkpoint {f} holds objects other than tensors and plain Python values, refused "
                             f"(weights_only){': ' + first.strip() if first else ''}; delete it to start the run "
                             f"over") from None
        except Exception as exc:  # noqa: BLE001 - truncated zip, bad header, …: any failure to read it
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise FedLTError(f"checkpoint {f} cannot be read ({reason}); delete it to start the run over") from None
        if not isinstance(ckpt, dict) or not {"step", "elapsed", "state"} <= set(ckpt):
            raise FedLTError(f"checkpoint {f} is not a fedlt checkpoint ({{step, elapsed, state}}); delete it to "
                             f"start the run over")
        return ckpt

    def reset(self) -> None:
        """Remove the results of an earlier run (a fresh start), its TensorBoard event files included."""
        self._close_board()
        self._purge_step = None
        for name in RESULTS:
            (self.path / name).unlink(missing_ok=True)
        for events in self.path.glob("events.out.tfevents.*"):
            events.unlink()

    def clear(self) -> None:
        """Remove every record of an earlier run, its config included (``--overwrite``)."""
        self.reset()
        for name in RECORDS:
            (self.path / name).unlink(missing_ok=True)
        for aside in self.path.glob("env.json.damaged*"):  # set aside by check_env: a record of that earlier run
            aside.unlink()


def _free_name(path: Path) -> Path:
    """``path`` where no file has that name, else the first free ``<path>.2``, ``<path>.3`` …"""
    n = 1
    while path.with_name(path.name + (f".{n}" if n > 1 else "")).exists():
        n += 1
    return path.with_name(path.name + (f".{n}" if n > 1 else ""))


def run_identity(config: dict) -> dict:
    """A run's resolved config (config.yaml's mapping) without what its mode does not depend on: the other
    mode's sections (:func:`fedlt.sweep.other_mode_sections`, as :func:`fedlt.sweep.identity`), and
    ``train.local_epochs`` where ``train.local_steps`` is set (written 1.0 by earlier versions)."""
    from fedlt.sweep import other_mode_sections

    ignored = other_mode_sections(config.get("mode"))
    out = {k: v for k, v in config.items() if k not in ignored}
    train = out.get("train")
    if isinstance(train, dict) and train.get("local_steps") is not None:
        out["train"] = {**train, "local_epochs": None}
    return out


def config_as_today(path: Path, written: dict) -> dict:
    """A run's config.yaml (``written``: its mapping) read through today's config schema, so that a key added to
    fedlt since the run is there at its default; as written where it no longer validates (a key removed since,
    a value now refused, a plug-in this process cannot import)."""
    try:
        return yaml.safe_load(dump_config(load_config(path)))
    except FedLTError:
        return written


def identity_digest(config: dict) -> str:
    """A short hash of :func:`run_identity` of a config.yaml mapping: a checkpoint records the config that wrote
    it, so that one copied in from a run of another config is refused, not resumed."""
    identity = run_identity(config)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _summary_problem(summary: Any) -> str | None:
    """What keeps ``summary`` (read from summary.json) from being a run's summary, or None."""
    if not isinstance(summary, dict):
        return f"a JSON {type(summary).__name__}, not an object"
    lacks = [k for k in SUMMARY_KEYS + SUMMARY_METRICS if k not in summary]
    if lacks:
        return f"lacks {', '.join(lacks)}"
    bad = [k for k in SUMMARY_METRICS if summary[k] is not None
           and (not isinstance(summary[k], Real) or isinstance(summary[k], bool) or not math.isfinite(summary[k]))]
    # fedlt writes a non-finite number as null: NaN or Infinity here was written by something else
    return f"{bad[0]} is not a finite number: {summary[bad[0]]!r}"[:200] if bad else None


PLAIN = (bool, int, float, str, bytes, type(None), torch.Tensor, torch.Size, torch.dtype)


def check_plain(obj: Any, where: str) -> None:
    """Raise TypeError (a bug of the part that made ``obj``) unless ``obj`` holds only tensors and plain Python
    values in dicts, lists and tuples: what ``torch.load(..., weights_only=True)`` reads back. ``where`` names
    the key path in the message (``checkpoint['state']['strategy']['prior']``)."""
    if isinstance(obj, PLAIN) and not isinstance(obj, np.generic):  # np.float64 is a float, but not plain
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds only "
                        f"tensors and plain Python values (convert numpy arrays with torch.from_numpy or .tolist())")
