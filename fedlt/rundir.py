"""The run directory: everything needed to trust and redo one run.

config.yaml (resolved), env.json, partition.json, metrics.jsonl (one line per round / epoch),
summary.json (final metrics), checkpoint.pt (resumable state), done (written last).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.config import dump_config


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


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

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

    def write_partition(self, counts: np.ndarray, train_counts: np.ndarray, test_counts: np.ndarray,
                        method: str) -> None:
        write_json(self.path / "partition.json", {
            "method": method, "num_clients": int(counts.shape[0]),
            "train_class_counts": train_counts, "test_class_counts": test_counts,
            "client_sizes": counts.sum(1), "client_class_counts": counts,
        })

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")

    def truncate_metrics(self, key: str, last: int) -> None:
        """Keep only rows with ``row[key] <= last`` (after resuming from a checkpoint)."""
        f = self.path / "metrics.jsonl"
        if f.is_file():
            rows = [r for r in (json.loads(x) for x in f.read_text().splitlines() if x) if r[key] <= last]
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)
        (self.path / "done").write_text("")

    def save_checkpoint(self, state: dict) -> None:
        tmp = self.path / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.path / "checkpoint.pt")

    def load_checkpoint(self) -> dict | None:
        f = self.path / "checkpoint.pt"
        return torch.load(f, weights_only=False) if f.is_file() else None

    def reset(self) -> None:
        for name in ("metrics.jsonl", "summary.json", "checkpoint.pt", "done"):
            (self.path / name).unlink(missing_ok=True)
