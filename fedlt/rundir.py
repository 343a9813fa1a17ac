"""The run directory: everything needed to trust and redo one run.

config.yaml (resolved), env.json, partition.json, metrics.jsonl (one line per round / epoch),
summary.json (final metrics), checkpoint.pt (resumable state), done (written last). Where the
``tensorboard`` package is installed (``pip install fedlt[tensorboard]``), the numbers of metrics.jsonl
also go to a TensorBoard event file (events.out.tfevents.*) in the same folder, so that
``tensorboard --logdir runs`` shows every run's curves.
"""

from __future__ import annotations

import json
import os
import pickle
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.config import dump_config
from fedlt.errors import FedLTError


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


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _summary_writer(path: Path, purge_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``path``, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path), purge_step=purge_step)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._board: Any = None  # the SummaryWriter, opened by the first metrics row; False: no tensorboard
        self._purge_step: int | None = None  # set by truncate_metrics

    @property
    def done(self) -> bool:
        return (self.path / "summary.json").is_file() and (self.path / "done").is_file()

    def write_config(self, cfg: dict) -> None:
        (self.path / "config.yaml").write_text(dump_config(cfg))

    def same_config(self, cfg: dict) -> bool:
        f = self.path / "config.yaml"
        return f.is_file() and f.read_text() == dump_config(cfg)

    def write_env(self, env: dict) -> None:
        write_json(self.path / "env.json", env)

    def update_env(self, extra: dict) -> None:
        """Add ``extra`` to env.json (what is known only at the end of a run, e.g. the peak memory)."""
        f = self.path / "env.json"
        write_json(f, {**(json.loads(f.read_text()) if f.is_file() else {}), **extra})

    def write_partition(self, counts: np.ndarray, train_counts: np.ndarray, test_counts: np.ndarray,
                        method: str) -> None:
        write_json(self.path / "partition.json", {
            "method": method, "num_clients": int(counts.shape[0]),
            "train_class_counts": train_counts, "test_class_counts": test_counts,
            "client_sizes": counts.sum(1), "client_class_counts": counts,
        })

    def append_metrics(self, row: dict) -> None:
        """Append ``row`` to metrics.jsonl and, where tensorboard is installed, its numbers to the event file:
        one scalar per key (``accuracy``, ``few``, ``train_loss``, ``seconds`` …) at the step ``row["round"]``
        (federated) or ``row["epoch"]`` (centralized); None, lists and strings are left out."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
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
        if f.is_file():
            rows = [r for r in (json.loads(x) for x in f.read_text().splitlines() if x) if r[key] <= last]
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._close_board()
        self._purge_step = last + 1

    def _close_board(self) -> None:
        if self._board:
            self._board.close()
        self._board = None

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)
        (self.path / "done").write_text("")
        self._close_board()

    def save_checkpoint(self, state: dict) -> None:
        """Write ``state`` atomically to checkpoint.pt. It must hold only tensors and plain Python values
        (:func:`check_plain`), so that :meth:`load_checkpoint` can read it with ``weights_only=True``."""
        check_plain(state, "checkpoint")
        tmp = self.path / "checkpoint.pt.tmp"
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
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt", "done"):
            (self.path / name).unlink(missing_ok=True)
        for events in self.path.glob("events.out.tfevents.*"):
            events.unlink()


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
