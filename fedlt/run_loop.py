"""The one run skeleton that federated rounds and centralized epochs share.

    lock the run directory (one run writes it at a time); refuse a directory that holds a run of another
    config (only ``--overwrite`` empties it, :mod:`fedlt.simulate`)
    resume from the checkpoint (same config, same data: :func:`data_fingerprint`; a damaged env.json is set aside,
        :meth:`~fedlt.rundir.RunDir.check_env`) or start afresh (reset the run directory, write its records,
        evaluate the initial model: row ``{round: 0, ...}`` / ``{epoch: 0, ...}``)
    for each step t (a round or an epoch) not yet done:
        train the step; evaluate on the test set when due (``eval.every``, always the last step);
        append the step's row to metrics.jsonl; print one progress line (with the run's elapsed time and
        its time left: mean seconds per step so far × steps left); checkpoint when due
        (and always when Ctrl-C asked the run to stop: then raise :class:`~fedlt.interrupt.RunInterrupted`)
    finish (a last change of the model without training, e.g. τ-norm), evaluate unless the last step's
    evaluation still holds, write summary.json (with the throughput: seconds per step, training images per
    second of training time) and add the peak memory to env.json

What differs between the two modes is a :class:`Steps` object: what one step trains, what the checkpoint
holds besides the step and the elapsed time, what the summary adds.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedlt.config import Config
from fedlt.data.image_cache import piece_digests
from fedlt.device import environment, peak_memory
from fedlt.errors import FedLTError
from fedlt.evaluation import due, metrics_row, progress_line
from fedlt.interrupt import RunInterrupted, stop_requested
from fedlt.metrics import NonFiniteOutputs
from fedlt.rundir import RunDir

if TYPE_CHECKING:
    from fedlt.data.sources import Split
    from fedlt.experiment import Experiment

class Steps(Protocol):
    """One run's steps, driven by :func:`run_steps`."""

    unit: str  # "round" or "epoch": the key of metrics.jsonl rows and of progress lines
    label: str  # progress prefix, e.g. "federated fedavg"
    exp: Experiment  # the data the steps train and test on (its fingerprint goes into every checkpoint)
    total: int  # number of steps
    checkpoint_every: int

    def start(self) -> None:
        """Before the first step of a fresh run (e.g. a strategy's set-up round)."""

    def step(self, t: int) -> dict[str, Any]:
        """Train step ``t`` (1-based); return the row's fields besides the test metrics (``train_loss``,
        ``train_images``: the training images processed in the step …)."""

    def evaluate(self, final: bool) -> dict:
        """Test metrics of the current model (``final``: with the reliability bins)."""

    def finish(self) -> bool:
        """After the last step: change the model without training if the method does; True if it changed."""

    def state_dict(self) -> dict:
        """What a checkpoint holds besides the step and the elapsed time."""

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self) -> dict:
        """What summary.json holds besides the final test metrics, the seed and the wall-clock time."""


def _evaluate(steps: Steps, final: bool, what: str) -> dict:
    """``steps.evaluate``; test outputs that are not finite stop the run naming ``what`` was evaluated (the
    checkpoint of this step is not written: the last one stays)."""
    try:
        return steps.evaluate(final=final)
    except NonFiniteOutputs as exc:
        raise NonFiniteOutputs(f"{what}: {exc}; the last checkpoint stays") from None


def data_fingerprint(exp: Experiment) -> dict[str, dict]:
    """What a run trains and tests on: per split (``train``, ``test``) its number of images and a SHA-256 (16 hex
    digits) of its class count, labels and decoded images, as the experiment holds them (after the long-tailed
    cut, resized). Every checkpoint records it, so that a run resumed after its data changed (a list file edited,
    images replaced, another CIFAR copy at data.root: the config is the same, the files it names are not) is
    refused instead of finishing on another data set than it started on.

    Why the decoded images and not the files: they are in memory already (or mapped from the image cache), so
    nothing is read or decoded again, and the digest is of what the model sees: a copy of the data set with new
    modification times is the same data, a list of other images with the same labels is not. Cost: hashing, on
    one thread per core (about 1 GB/s each): a tenth of a second for CIFAR-10. A split mapped from the image
    cache brings the digests of its file's pieces, taken once when the file was built
    (:func:`~fedlt.data.image_cache.load_cached`): ImageNet-LT's 25 GB at 224 px are not read again at every
    run start and resume."""
    return {name: _split_digest(split) for name, split in (("train", exp.train), ("test", exp.test))}


def _split_digest(split: Split) -> dict[str, Any]:
    """``{"images": N, "digest": 16 hex digits}`` of one split (:func:`data_fingerprint`)."""
    h = hashlib.sha256(f"fedlt-data-v1 classes={split.num_classes}\n".encode())
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    if split.images is not None:  # (None: a split that was never decoded)
        h.update(f"images {split.images.dtype} {tuple(split.images.shape)}\n".encode())
        for piece in split.piece_digests or piece_digests(split.images):
            h.update(piece)
    return {"images": len(split), "digest": h.hexdigest()[:16]}


def data_change(then: Any, now: dict[str, dict]) -> str | None:
    """How the data of a checkpoint (``then``, its :func:`data_fingerprint`) differs from the data now, e.g.
    ``training set: 300 images at the checkpoint, 600 now``; None where it does not."""
    changes = []
    for split, name in (("train", "training set"), ("test", "test set")):
        old = then.get(split) if isinstance(then, dict) else None
        old = old if isinstance(old, dict) else {}
        if old == now[split]:
            continue
        if old.get("images") != now[split]["images"]:
            changes.append(f"{name}: {old.get('images', 'unknown')} images at the checkpoint, "
                           f"{now[split]['images']} now")
        else:
            changes.append(f"{name}: {now[split]['images']} images, other images or labels now")
    return "; ".join(changes) or None


def check_same_data(run: RunDir, ckpt: dict, data: dict[str, dict], unit: str) -> None:
    """Refuse to resume ``run`` from ``ckpt`` where its data changed since (:func:`data_fingerprint`), in one line
    naming the run directory, what changed and what to do. A checkpoint of an earlier fedlt records no data and
    resumes (as one without the config digest does)."""
    if "data" not in ckpt:
        return
    change = data_change(ckpt["data"], data)
    if change:
        raise FedLTError(f"run directory {run.path}: the data changed since its checkpoint after {unit} "
                         f"{ckpt.get('step')} ({change}); restore the data the run started with and run the same "
                         f"command again to resume, or delete {run.path / 'checkpoint.pt'} to start the run over")


def plan_line(cfg: Config, steps: Steps, start: int = 1) -> str:
    """What the run will do, said before its first step: ``20 rounds, 5 of 10 clients per round, 1 local epoch
    each; time left on every progress line``."""
    what = f"{steps.total} {steps.unit}{'s' if steps.total != 1 else ''}"
    if steps.unit == "round":
        from fedlt.federation.fused import not_fused_note

        k = cfg.partition.num_clients
        t = cfg.train
        local = f"{t.local_steps} local steps" if t.local_steps else f"{t.local_epochs:g} local epoch(s)"
        what += f", {max(1, round(cfg.federation.fraction * k))} of {k} clients per round, {local} each"
        what += not_fused_note(cfg)
    elif cfg.centralized.epochs != int(cfg.centralized.epochs):
        what += f" (centralized.epochs={cfg.centralized.epochs:g}: its last epoch is a partial one)"
    if start > 1:
        what += f"; {steps.total - start + 1} left"
    return f"{what}; elapsed time and time left (eta) on every progress line"


def run_steps(cfg: Config, run: RunDir, steps: Steps, partition: tuple, device: Any) -> dict:
    """Run (or resume) ``steps`` into ``run``; return the summary. ``partition`` is (client × class counts,
    training class counts, test class counts, method name[, local test sets]) for partition.json
    (:meth:`RunDir.write_partition`). Holds the run directory's lock
    throughout (:meth:`RunDir.lock`); a directory of another config is a :class:`FedLTError`."""
    with run.lock():
        run.check_config(cfg)
        return _run_steps(cfg, run, steps, partition, device)


def _run_steps(cfg: Config, run: RunDir, steps: Steps, partition: tuple, device: Any) -> dict:
    ckpt = run.load_checkpoint() if run.same_config(cfg) else None
    meters = {"train_seconds": 0.0, "train_images": 0}  # time in steps.step() and the images it trained on
    if ckpt is None:
        run.reset()
        run.write_config(cfg)
        run.write_env(environment(device))
        run.write_partition(*partition)
    # config.yaml as written (by this run, or by the fedlt that started it): what its checkpoints record
    digest = run.config_digest()
    data = data_fingerprint(steps.exp)  # the data loaded now: what its checkpoints record too
    if ckpt is None:
        steps.start()
        start, elapsed = 1, 0.0
    else:
        if ckpt.get("config", digest) != digest:  # copied in from another run (older checkpoints lack the key)
            raise FedLTError(f"checkpoint {run.path / 'checkpoint.pt'} was written by a run of another config than "
                             f"the folder's config.yaml: delete it to start the run over")
        check_same_data(run, ckpt, data, steps.unit)
        run.check_env(lambda: environment(device))  # env.json is added to at the end: a damaged one is set aside now
        try:
            steps.load_state_dict(ckpt["state"])
            start, elapsed = ckpt["step"] + 1, ckpt["elapsed"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a checkpoint of another kind of run
            reason = (str(exc).strip().splitlines() or [""])[0][:120]
            raise FedLTError(f"checkpoint {run.path / 'checkpoint.pt'} does not fit this run "
                             f"({type(exc).__name__}: {reason}): delete it to start the run over") from None
        meters.update({k: ckpt[k] for k in meters if k in ckpt})
        run.truncate_metrics(steps.unit, ckpt["step"])
        print(f"[{steps.label}] resuming after {steps.unit} {ckpt['step']}", flush=True)

    print(f"[{steps.label}] {plan_line(cfg, steps, start)}", flush=True)
    if ckpt is None:  # the initial model: step 0 of the accuracy curve
        t0 = time.time()
        metrics = _evaluate(steps, False, "the initial model")
        seconds = time.time() - t0
        elapsed += seconds
        run.append_metrics({steps.unit: 0, **metrics_row(metrics), "seconds": seconds})
        print(progress_line(f"[{steps.label}] {steps.unit} 0/{steps.total} (initial model)", metrics, seconds),
              flush=True)
    metrics = None
    for t in range(start, steps.total + 1):
        t0 = time.time()
        fields = steps.step(t)
        meters["train_seconds"] += time.time() - t0
        meters["train_images"] += int(fields.get("train_images") or 0)
        metrics = _evaluate(steps, t == steps.total, f"{steps.unit} {t}") if due(t, steps.total, cfg.eval.every) \
            else None
        seconds = time.time() - t0
        elapsed += seconds
        run.append_metrics({steps.unit: t, **(metrics_row(metrics) if metrics else {}), **fields, "seconds": seconds})
        print(progress_line(f"[{steps.label}] {steps.unit} {t}/{steps.total}", metrics, seconds,
                            fields.get("train_loss"), elapsed, elapsed / t * (steps.total - t)), flush=True)
        stop = stop_requested() and t < steps.total
        if due(t, steps.total, steps.checkpoint_every) or stop:
            run.save_checkpoint({"step": t, "elapsed": elapsed, "config": digest, "data": data,
                                 "state": steps.state_dict(), **meters})
        if stop:
            raise RunInterrupted(f"[{steps.label}] stopped after {steps.unit} {t}/{steps.total}; "
                                 f"checkpoint: {run.path / 'checkpoint.pt'}")

    if steps.finish() or metrics is None:  # changed after the last step, or no step ran now (a finished run)
        metrics = _evaluate(steps, True, "the final model")
    done = max(steps.total, 1)
    throughput = {f"seconds_per_{steps.unit}": elapsed / done, **meters,
                  "images_per_second": meters["train_images"] / meters["train_seconds"]
                  if meters["train_seconds"] > 0 else None}
    memory = peak_memory(device)
    run.update_env(memory)
    summary = {**steps.summary(), "seed": cfg.seed, "wall_clock_seconds": elapsed, **throughput, **memory,
               **metrics, "config_digest": digest,  # config.yaml's, checked where the run is read
               "data_fingerprint": data}
    run.write_summary(summary)
    return summary
