"""The one run skeleton that federated rounds and centralized epochs share.

    lock the run directory (one run writes it at a time); refuse a directory that holds a run of another
    config (only ``--overwrite`` empties it, :mod:`fedlt.simulate`)
    resume from the checkpoint (same config) or start afresh (reset the run directory, write its records)
    for each step t (a round or an epoch) not yet done:
        train the step; evaluate on the test set when due (``eval.every``, always the last step);
        append the step's row to metrics.jsonl; print one progress line; checkpoint when due
    finish (a last change of the model without training, e.g. τ-norm), evaluate unless the last step's
    evaluation still holds, write summary.json

What differs between the two modes is a :class:`Steps` object: what one step trains, what the checkpoint
holds besides the step and the elapsed time, what the summary adds.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from fedlt.config import Config
from fedlt.device import environment
from fedlt.evaluation import due, metrics_row, progress_line
from fedlt.rundir import RunDir


class Steps(Protocol):
    """One run's steps, driven by :func:`run_steps`."""

    unit: str  # "round" or "epoch": the key of metrics.jsonl rows and of progress lines
    label: str  # progress prefix, e.g. "federated fedavg"
    total: int  # number of steps
    checkpoint_every: int

    def start(self) -> None:
        """Before the first step of a fresh run (e.g. a strategy's set-up round)."""

    def step(self, t: int) -> dict[str, Any]:
        """Train step ``t`` (1-based); return the row's fields besides the test metrics (``train_loss`` …)."""

    def evaluate(self, final: bool) -> dict:
        """Test metrics of the current model (``final``: with the reliability bins)."""

    def finish(self) -> bool:
        """After the last step: change the model without training if the method does; True if it changed."""

    def state_dict(self) -> dict:
        """What a checkpoint holds besides the step and the elapsed time."""

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self) -> dict:
        """What summary.json holds besides the final test metrics, the seed and the wall-clock time."""


def run_steps(cfg: Config, run: RunDir, steps: Steps, partition: tuple[np.ndarray, np.ndarray, np.ndarray, str],
              device: Any) -> dict:
    """Run (or resume) ``steps`` into ``run``; return the summary. ``partition`` is (client × class counts,
    training class counts, test class counts, method name) for partition.json. Holds the run directory's lock
    throughout (:meth:`RunDir.lock`); a directory of another config is a :class:`FedLTError`."""
    with run.lock():
        run.check_config(cfg)
        return _run_steps(cfg, run, steps, partition, device)


def _run_steps(cfg: Config, run: RunDir, steps: Steps, partition: tuple[np.ndarray, np.ndarray, np.ndarray, str],
               device: Any) -> dict:
    ckpt = run.load_checkpoint() if run.same_config(cfg) else None
    if ckpt is None:
        run.reset()
        run.write_config(cfg)
        run.write_env(environment(device))
        run.write_partition(*partition)
        steps.start()
        start, elapsed = 1, 0.0
    else:
        steps.load_state_dict(ckpt["state"])
        start, elapsed = ckpt["step"] + 1, ckpt["elapsed"]
        run.truncate_metrics(steps.unit, ckpt["step"])
        print(f"[{steps.label}] resuming after {steps.unit} {ckpt['step']}", flush=True)

    metrics = None
    for t in range(start, steps.total + 1):
        t0 = time.time()
        fields = steps.step(t)
        metrics = steps.evaluate(final=t == steps.total) if due(t, steps.total, cfg.eval.every) else None
        seconds = time.time() - t0
        elapsed += seconds
        run.append_metrics({steps.unit: t, **(metrics_row(metrics) if metrics else {}), **fields, "seconds": seconds})
        print(progress_line(f"[{steps.label}] {steps.unit} {t}/{steps.total}", metrics, seconds,
                            fields.get("train_loss")), flush=True)
        if due(t, steps.total, steps.checkpoint_every):
            run.save_checkpoint({"step": t, "elapsed": elapsed, "state": steps.state_dict()})

    if steps.finish() or metrics is None:  # changed after the last step, or no step ran now (a finished run)
        metrics = steps.evaluate(final=True)
    summary = {**steps.summary(), "seed": cfg.seed, "wall_clock_seconds": elapsed, **metrics}
    run.write_summary(summary)
    return summary
