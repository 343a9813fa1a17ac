"""``python -m fedlt.simulate``: run one config (federated, centralized or both) into run directories.

    python -m fedlt.simulate [--config FILE] [--out DIR] [--overwrite] [--wait] [--jobs N] [KEY=VALUE ...]
                             [sweep.KEY=[V1,V2,...] ...]
    python -m fedlt.simulate --dry-run [--config FILE] [KEY=VALUE ...]
    python -m fedlt.simulate --list | --keys [PART] [--config FILE] [plugins=[MODULE,...]]

``--dry-run`` prints what would run and what it would cost: the resolved config (every key with where its
value came from), the partition, the rounds / epochs and local steps, and an estimate of the wall time from
a few timed SGD steps and one test-set evaluation on this machine; it trains nothing and writes no run
directory. ``--list`` and ``--keys`` show the built-in parts and those of the plug-in modules that ``--config``
or a ``plugins=[...]`` override names (no other key of the config is read).

A ``sweep:`` mapping in the config (or ``sweep.KEY=[...]`` overrides) runs every combination of the
listed values, each into its own run directory; finished runs are skipped (see fedlt/sweep.py).
``--jobs N`` runs N of them at once, each in a ``python -m fedlt.simulate`` process of its own.

Ctrl-C stops after the current round or epoch: the checkpoint is written, the command that resumes is
printed, the exit status is 130 (a second Ctrl-C aborts at once, also with 130; see fedlt/interrupt.py).

A run directory (``<out>/<name>-seed<seed>-fed-<strategy>`` …) that holds a run of another config, finished
or not, is refused before anything runs (a one-line error naming the first differing key) unless
``--overwrite`` is given; a directory another run is writing is refused (or, with ``--wait``, waited for).
A client failure that ends a federated run prints the client's partition id and traceback and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedlt.interrupt import exit_on_sigint_while_starting

if __name__ == "__main__":  # a Ctrl-C while the imports below run: exit 130 without a traceback
    exit_on_sigint_while_starting()

import numpy as np  # noqa: E402

from fedlt.config import Config, dump_config
from fedlt.errors import ClientFailure, FedLTError
from fedlt.evaluation import duration
from fedlt.interrupt import (
    EXIT_INTERRUPTED,
    RunInterrupted,
    install_stop_handler,
    stop_handler_installed,
    stop_requested,
)

if TYPE_CHECKING:
    from fedlt.sweep import PlannedRun


def check_out(out: str, create: bool = True) -> None:
    """``--out`` is a folder (made if missing) that this process can write in, or a one-line error; without
    ``create`` (``--dry-run``, which writes nothing) only a file there is refused."""
    if not out.strip():  # Path("") is ".": the run directories would land in the working directory unasked
        raise FedLTError("--out is empty: give a folder for the run directories (default: runs)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FedLTError(f"--out {out} is a file, not a folder for run directories")
    from fedlt.report.runs import enclosing_run

    if (run := enclosing_run(path)) is not None:
        raise FedLTError(f"--out {out} is inside the run directory {run}: give a folder outside it (run directories "
                         f"go side by side, e.g. its parent {run.parent})")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise FedLTError(f"--out {out} is not a folder this process can write in: {exc.strerror or exc}") from None


def check_data(cfgs: list[Config]) -> None:
    """Build the data of every distinct data/partition/seed once, and check the federated runs' client
    resources: fail early on missing data, an impossible partition or resources the machine lacks, before
    any run starts."""
    from fedlt.device import check_device
    from fedlt.experiment import check_overridden_model_keys, experiment_for
    from fedlt.federation.runner import check_resources
    from fedlt.registry import CENTRALIZED

    seen = set()
    for cfg in cfgs:
        check_device(cfg.device)
        if cfg.mode != "centralized":
            check_resources(cfg)
        exp = experiment_for(cfg)
        check_steps(cfg, exp)
        check_augment_sizes(cfg, exp)
        if cfg.mode in ("centralized", "both"):  # a model key the method sets itself, given another value
            check_overridden_model_keys(cfg, CENTRALIZED.get(cfg.centralized.method)(cfg, exp.train_counts)
                                        .model_options())
        counts = exp.train_counts
        ratio = f"N_max/N_min = {counts.max() / counts.min():.4g}" if counts.min() > 0 else "N_max/N_min = inf"
        shape = (f"{cfg.data.profile} profile, IF={cfg.data.imbalance_factor:g}" if cfg.data.profile != "none"
                 else "profile none: the training set as given")
        line = (f"data: {cfg.data.name} ({shape}; {ratio}): {len(exp.train)} train / {len(exp.test)} test, "
                f"{exp.num_classes} classes; {cfg.partition.num_clients} clients ({cfg.partition.method}, "
                f"alpha={cfg.partition.alpha:g})")
        if line not in seen:
            seen.add(line)
            print(line, flush=True)
            warn_missing_classes(counts, exp.test.class_counts)
        for warning in unused_keys(cfg):
            if warning not in seen:
                seen.add(warning)
                print(f"warning: {warning}", flush=True)


def unused_keys(cfg: Config) -> list[str]:
    """Keys the config gives that change nothing in its runs, each as a line: what each section the run's
    ``mode`` reads says of its own keys (:meth:`fedlt.options.Options.unused`: milestones without a step schedule
    or at/after its end, a partition key of another partition method, β under ``data.profile=none``, a Cutout
    size without AutoAugment, fine-tuning epochs without a local evaluation, a round past the last …). Said, not
    refused: a base config's schedule swept against another is a usual comparison."""
    from fedlt.sweep import other_mode_sections

    out = []
    for section in ("data", "partition", "model", "train", "federation", "strategy", "client", "centralized", "eval"):
        if section not in other_mode_sections(cfg.mode):
            out += getattr(cfg, section).unused(cfg, section)
    return out


def _classes(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(c)) for c in ids[:5])
    return shown + (f", … ({len(ids)} in all)" if len(ids) > 5 else "")


def warn_missing_classes(train_counts: np.ndarray, test_counts: np.ndarray) -> None:
    """One warning line for classes without a training image (a file list's: nothing to learn them from, they
    count as few-shot) and one for classes without a test image (no accuracy: balanced accuracy and the
    many/medium/few means skip them)."""
    c = len(train_counts)
    no_train, no_test = np.flatnonzero(train_counts == 0), np.flatnonzero(test_counts == 0)
    if len(no_train):
        print(f"warning: {len(no_train)} of {c} classes have no training image (class {_classes(no_train)}): no "
              f"model can learn them; they count as few-shot and their test images as errors", flush=True)
    if len(no_test):
        print(f"warning: {len(no_test)} of {c} classes have no test image (class {_classes(no_test)}): they have "
              f"no accuracy; balanced accuracy and the many/medium/few means leave them out", flush=True)


def check_augment_sizes(cfg: Config, exp) -> None:
    """A random-crop padding or a Cutout hole of at least the images' side is a one-line error: a crop could then
    hold padding only, and most hold little of the image (``data.crop_padding=1000`` on 28-px images trained on
    blanks); a hole centred mid-image blanks the whole image (``data.cutout=100``: zeros only)."""
    images = getattr(exp.train, "images", None)
    if images is None or images.ndim != 4:
        return
    side, pad = min(images.shape[-2:]), cfg.data.crop_padding
    if pad >= side:
        raise FedLTError(f"config key 'data.crop_padding' ({pad}) is at least the side of the images ({side} px): a "
                         f"random crop could hold padding only; use a few pixels (4 on CIFAR's 32)")
    holes = [("data.cutout", cfg.data.cutout)]
    if cfg.mode in ("centralized", "both") and getattr(cfg.centralized, "autoaugment", False):
        holes.append(("centralized.cutout", cfg.centralized.cutout))
    for key, size in holes:
        if size >= side:
            raise FedLTError(f"config key {key!r} ({size}) is at least the side of the images ({side} px): its hole "
                             f"could blank whole images; use about half the side (16 on CIFAR's 32)")


def check_steps(cfg: Config, exp) -> None:
    """A fraction of an epoch that rounds to no step at all: centralized ``epochs`` below one batch is a one-line
    error (the run would train nothing and report the initial model), as are federated ``train.local_epochs``
    that give no client a step; where only some clients get none, one warning line says how many."""
    from fedlt.centralized.run import centralized_optim
    from fedlt.registry import STRATEGIES
    from fedlt.train import epoch_steps, steps_per_epoch

    if cfg.mode in ("centralized", "both"):
        batch, n = centralized_optim(cfg).batch_size, len(exp.train)
        if epoch_steps(n, batch, min(1.0, cfg.centralized.epochs)) == 0:  # its first (partial) epoch
            raise FedLTError(f"config key 'centralized.epochs' ({cfg.centralized.epochs:g}) is less than one batch "
                             f"of the {n} training images at batch {batch}: give at least "
                             f"{0.5 / steps_per_epoch(n, batch):.3g}")
    if cfg.mode in ("federated", "both") and cfg.train.local_steps is None:
        batch, epochs = cfg.train.batch_size, cfg.train.local_epochs
        idle = sum(epoch_steps(len(p), batch, epochs) == 0 for p in exp.parts)
        if idle == len(exp.parts):
            raise FedLTError(f"config key 'train.local_epochs' ({epochs:g}) gives no client a local step (the "
                             f"largest holds {max(len(p) for p in exp.parts)} images at batch {batch}): raise it or "
                             f"set train.local_steps")
        if idle and getattr(STRATEGIES.get(cfg.strategy.name), "clipping", None):
            raise FedLTError(f"config key 'train.local_epochs' ({epochs:g}) gives {idle} of {len(exp.parts)} clients "
                             f"no local step, and {cfg.strategy.name}'s clipping divides by each update's norm (0 for "
                             f"them): raise it or set train.local_steps")
        if idle:
            print(f"warning: train.local_epochs={epochs:g} gives {idle} of {len(exp.parts)} clients no local step "
                  f"(their replies are the global model unchanged)", flush=True)


def run_config(cfg: Config, out: str, verbose: bool = False, overwrite: bool = False) -> list[dict]:
    """Run every part of ``cfg``; a finished run directory with the same config is skipped."""
    return run_sweep([(cfg, {})], out, verbose, overwrite)


def run_one(mode: str, cfg: Config, path: Path, verbose: bool = False, overwrite: bool = False,
            wait: bool = False) -> dict:
    """Run (or resume) one planned run into ``path``, holding its directory's lock (``wait``: wait for another run
    to release it; else a one-line error); ``overwrite`` empties a directory that holds a run of another config
    first. Return its summary."""
    from fedlt.centralized import run_centralized
    from fedlt.federation.fused import run_fused
    from fedlt.federation.inprocess import run_inprocess
    from fedlt.federation.runner import run_federated
    from fedlt.rundir import RunDir

    run = RunDir(path)
    with run.lock(wait):
        if overwrite and run.config_conflict(cfg):
            print(f"[{mode}] --overwrite: removing the run of another config in {path}", flush=True)
            run.clear()
        if mode == "centralized":
            return run_centralized(cfg, run)
        engine = {"flower": run_federated, "inprocess": run_inprocess, "fused": run_fused}[cfg.federation.engine]
        return engine(cfg, str(path), verbose)


def run_sweep(combos: list[tuple[Config, dict]], out: str, verbose: bool = False, jobs: int = 1,
              overwrite: bool = False, wait: bool = False) -> list[dict]:
    """Run the distinct runs of validated sweep combinations (see :mod:`fedlt.sweep`), one after another or
    ``jobs`` at once (:func:`run_parallel`); a finished run directory with the same config is skipped, an
    unfinished one resumes. A directory of another config is a :class:`FedLTError` before any run starts,
    unless ``overwrite`` (then it is emptied first); each run holds its directory's lock (:func:`run_one`).
    Summaries in the order of the plan."""
    from fedlt.rundir import RunDir

    check_out(out, create=False)
    runs = check_plan(combos, out, overwrite)  # (data, partitions, devices: a refusal leaves no folder behind)
    check_out(out)
    summaries: list[dict | None] = [None] * len(runs)
    todo = []
    for i, r in enumerate(runs):
        count = f" ({i + 1}/{len(runs)})" if len(combos) > 1 else ""
        run = RunDir(r.path)
        if run.done and run.same_config(r.cfg):
            summaries[i] = run.read_summary()
            print(f"[{r.mode}] {r.path} already finished; skipped{count}", flush=True)
        else:
            todo.append((i, count))
    if jobs > 1 and len(todo) > 1:
        for i, s in run_parallel([runs[i] for i, _ in todo], jobs, verbose, overwrite, wait).items():
            summaries[todo[i][0]] = s
    else:
        took: dict[str, list[float]] = {"federated": [], "centralized": []}  # seconds of the runs this sweep ran
        for n, (i, count) in enumerate(todo, 1):
            if stop_requested():  # Ctrl-C while the previous run finished its last step
                raise RunInterrupted(f"stopped before {runs[i].path}")
            r = runs[i]
            resumed, t0 = RunDir(r.path).resumes(r.cfg), time.time()
            summaries[i] = run_one(r.mode, r.cfg, r.path, verbose, overwrite, wait)
            took[r.mode].append(time.time() - t0)
            left = [runs[j] for j, _ in todo[n:]]
            eta = f"; sweep eta {duration(sweep_eta(left, took))}" if len(runs) > 1 and left else ""
            print(finished_line(r, took[r.mode][-1], summaries[i], resumed) + f"{count}{eta}", flush=True)
    label = len(combos) > 1
    return [{**s, **({"run": r.path.name} if label else {})} for r, s in zip(runs, summaries)]


def finished_line(r: PlannedRun, seconds: float, summary: dict, resumed: bool) -> str:
    """``[federated] finished in 17.9s -> runs/x``: the seconds this process took for planned run ``r``; a run
    that resumed from a checkpoint adds the whole run's time (summary.json's ``wall_clock_seconds``: its steps
    and evaluations, every process that ran them), so that a resumed run is not read as a quick one."""
    whole = ""
    if resumed:
        unit = "rounds" if r.mode == "federated" else "epochs"
        whole = f" (resumed; {float(summary.get('wall_clock_seconds') or 0):.1f}s of {unit} and evaluations in all)"
    return f"[{r.mode}] finished in {seconds:.1f}s{whole} -> {r.path}"


def check_plan(combos: list[tuple[Config, dict]], out: str, overwrite: bool = False) -> list:
    """What a sweep checks before any run starts (a real one and ``--dry-run`` alike): its planned runs
    (:func:`fedlt.sweep.plan`), a run directory that holds a run of another config (unless ``overwrite``), and
    the data, partitions, steps, devices and client resources of every config (:func:`check_data`). Each failure
    is a one-line :class:`FedLTError`; returns the planned runs."""
    from fedlt.rundir import RunDir
    from fedlt.sweep import plan

    runs = plan(combos, out)
    for r in runs:
        if (r.path.exists() or r.path.is_symlink()) and not r.path.is_dir():  # mkdir raised after the data loaded
            raise FedLTError(f"run directory {r.path} is a file (or a broken link), not a folder: move it, or give "
                             f"another --out or name=")
        if not overwrite and r.path.is_dir():
            RunDir(r.path).check_config(r.cfg)
    check_data([c for c, _ in combos])
    return runs


def _relay(stream, prefix: str) -> None:
    """Print each line of a child's output with ``prefix`` (one thread per child; print's lines do not mix)."""
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()
    stream.close()


def run_parallel(runs: list[PlannedRun], jobs: int, verbose: bool = False, overwrite: bool = False,
                 wait: bool = False) -> dict[int, dict]:
    """Run ``runs`` (planned runs, none finished) ``jobs`` at a time, each as ``python -m fedlt.simulate
    --config <its resolved config> --run-dir <its directory>``; return {index: summary}.

    Each child writes only its own run directory; its output lines come out prefixed by the run's name.
    The children share the CPU cores (each keeps torch's thread count, so its results are those of a run on
    its own) and, on a GPU, the card. They run
    in sessions of their own, so that Ctrl-C reaches them once, through this process: the first Ctrl-C
    starts no further run and asks the running ones to stop after their current step (they checkpoint),
    a second one aborts them. A failed run lets the others finish, then raises a one-line FedLTError."""
    from fedlt.rundir import RunDir

    env = dict(os.environ)
    tmp = Path(tempfile.mkdtemp(prefix="fedlt-jobs-"))
    pending = list(enumerate(runs))
    running: dict[int, tuple[subprocess.Popen, threading.Thread, float, bool]] = {}  # (…, started, resumes)
    done: dict[int, dict] = {}
    failed: list[str] = []
    forwarded = 0  # SIGINTs forwarded to the children
    interrupts = 0
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nstopping the running runs after their current step (Ctrl-C again to abort) ...",
                  file=sys.stderr, flush=True)

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            stop = interrupts > 0 or stop_requested()
            if not running and (stop or not pending):  # stopped: the runs not started stay pending
                break
            while pending and len(running) < jobs and not stop:
                i, r = pending.pop(0)
                cfg_file = tmp / f"{i}.yaml"
                cfg_file.write_text(dump_config(r.cfg))
                cmd = [sys.executable, "-m", "fedlt.simulate", "--config", str(cfg_file), "--run-dir", str(r.path)]
                cmd += ["--verbose"] * verbose + ["--overwrite"] * overwrite + ["--wait"] * wait
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                        start_new_session=True)
                relay = threading.Thread(target=_relay, args=(proc.stdout, f"[{r.path.name}] "), daemon=True)
                relay.start()
                running[i] = (proc, relay, time.time(), RunDir(r.path).resumes(r.cfg))
            wanted = min(interrupts + (1 if stop_requested() and interrupts == 0 else 0), 2)
            while forwarded < wanted:
                forwarded += 1
                for proc, *_ in running.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
            for i, (proc, relay, t0, resumed) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                relay.join()
                del running[i]
                r = runs[i]
                if rc == 0:
                    done[i] = json.loads((r.path / "summary.json").read_text())
                    print(finished_line(r, time.time() - t0, done[i], resumed), flush=True)
                elif rc != EXIT_INTERRUPTED:
                    failed.append(f"{r.path.name} (exit status {rc})")
            time.sleep(0.05)
    finally:
        for proc, *_ in running.values():  # only after an error here: no child outlives the sweep
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if interrupts or stop_requested():
        raise RunInterrupted(f"stopped {len(runs) - len(done)} of {len(runs)} runs of the sweep")
    if failed:
        raise FedLTError(f"{len(failed)} run(s) failed, see their output above: {', '.join(failed)}")
    return done


def sweep_eta(left: list, took: dict[str, list[float]]) -> float:
    """Seconds the sweep's runs ``left`` (not yet finished) will take: each the mean time of the runs of its mode
    this sweep ran (of any mode where none of its own ran yet). An estimate: runs of a sweep differ in cost."""
    every = [x for xs in took.values() for x in xs]
    mean = {m: float(np.mean(xs or every)) for m, xs in took.items()}
    return sum(mean[r.mode] for r in left if not (r.path / "done").is_file())


# ------------------------------------------------------------------------------------------ dry run

def config_lines(cfg: Config, sources: dict[str, str]) -> list[str]:
    """``key = value   (where it came from)`` for every key of the resolved config."""
    from fedlt.sweep import flatten

    flat = flatten(cfg.model_dump(mode="json", exclude={"sweep"}))
    width = max(len(f"{k} = {v}") for k, v in flat.items())
    return [f"  {f'{k} = {v}':<{width}}   ({sources.get(k, 'default')})" for k, v in flat.items()]


def partition_lines(cfg: Config, exp) -> list[str]:
    """The clients' sizes and classes: a summary line, then one line per client (the first 20)."""
    counts = exp.partition_counts()
    sizes, classes = counts.sum(1), (counts > 0).sum(1)

    def spread(x: np.ndarray) -> str:
        return f"{int(x.min())} / {int(np.median(x))} / {int(x.max())}"

    lines = [(f"partition: {len(sizes)} clients ({cfg.partition.method}); samples per client min / median / max "
              f"{spread(sizes)}; classes per client {spread(classes)} of {exp.num_classes}")]
    lines += [f"  client {k}: {int(n)} samples, {int(c)} class{'es' if c != 1 else ''}"
              for k, (n, c) in enumerate(zip(sizes, classes)) if k < 20]
    if len(sizes) > 20:
        lines.append(f"  … {len(sizes) - 20} more clients")
    return lines


def time_model(cfg: Config, exp, model, batch_size: int, cache: dict | None = None,
               steps: int = 3) -> tuple[float, float]:
    """(seconds per local SGD step, seconds per test-set evaluation) of ``model`` on this machine: one warm-up
    step, then ``steps`` timed plain cross-entropy SGD steps of ``batch_size`` with the run's augmentation, then
    one evaluation of the whole test set. Timed once per model, data and batch size in ``cache``."""
    import torch

    from fedlt.device import resolve_device
    from fedlt.evaluation import evaluate_model
    from fedlt.experiment import augment_for
    from fedlt.streams import Stream, torch_generator
    from fedlt.train import OptimConfig, train

    device = resolve_device(cfg.device)
    key = (repr(model), cfg.data.model_dump_json(), cfg.seed, batch_size, cfg.eval.batch_size, str(device))
    if cache is not None and key in cache:
        return cache[key]
    model = model.to(device)
    data = exp.tensor_data("train", device=device)
    opt = OptimConfig(lr=1e-3, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
                      batch_size=batch_size)
    gen = torch_generator(cfg.seed, Stream.CLIENT, 0, 0)
    train(model, data, opt=opt, steps=1, generator=gen, augment=augment_for(cfg, data))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    train(model, data, opt=opt, steps=steps, generator=gen, augment=augment_for(cfg, data))
    sync()
    step = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    evaluate_model(model, exp.tensor_data("test", device=device), exp.train_counts, cfg.eval.batch_size)
    sync()
    timing = step, time.perf_counter() - t0
    if cache is not None:
        cache[key] = timing
    return timing


def run_estimate(mode: str, cfg: Config, exp, cache: dict | None = None, start: int = 0) -> tuple[str, float]:
    """(what the run does, its estimated seconds) from :func:`time_model`; of the rounds / epochs after ``start``
    where a checkpoint holds the first ``start`` of them (a resumed run)."""
    from fedlt.config import federated_method
    from fedlt.evaluation import due_count
    from fedlt.experiment import model_for
    from fedlt.train import epoch_steps, steps_per_epoch

    done_evals = 1 + due_count(start, cfg.eval.every) if start else 0  # the checkpoint's: step 0's and the due ones
    if mode == "federated":
        t, fed = cfg.train, cfg.federation
        k = cfg.partition.num_clients
        cohort = max(1, round(fed.fraction * k))
        sizes = exp.partition_counts().sum(1)
        local = np.array([t.local_steps or epoch_steps(n, t.batch_size, t.local_epochs) for n in sizes])
        step, evaluation = time_model(cfg, exp, model_for(cfg, exp), t.batch_size, cache)
        evals = 1 + due_count(fed.rounds, cfg.eval.every)  # the initial model's (round 0) and the due ones
        seconds = (fed.rounds - start) * cohort * float(local.mean()) * step + (evals - done_evals) * evaluation
        what = (f"federated {federated_method(cfg)}: {fed.rounds} rounds × {cohort} of {k} clients × "
                f"{local.mean():.0f} local steps (batch {t.batch_size}; {int(local.min())}–{int(local.max())} "
                f"per client) = {fed.rounds * cohort * local.mean():,.0f} steps, {evals} evaluations")
        from fedlt.federation.fused import not_fused_note

        what += not_fused_note(cfg)
        return what + resume_note("round", start, fed.rounds), seconds
    from fedlt.centralized.run import centralized_optim, pretrain_epochs
    from fedlt.registry import CENTRALIZED

    method = CENTRALIZED.get(cfg.centralized.method)(cfg, exp.train_counts)
    bs = centralized_optim(cfg).batch_size
    pretrain = pretrain_epochs(cfg)
    epochs = pretrain + math.ceil(cfg.centralized.epochs) + method.stage2_epochs()  # as the run's progress counts
    per_epoch = steps_per_epoch(len(exp.train), bs)
    steps = (pretrain + method.stage2_epochs()) * per_epoch + epoch_steps(len(exp.train), bs, cfg.centralized.epochs)
    step, evaluation = time_model(cfg, exp, method.build_model(exp), bs, cache)
    evals = 1 + due_count(epochs, cfg.eval.every)  # the initial model's (epoch 0) and the due ones
    shown = pretrain + cfg.centralized.epochs + method.stage2_epochs()  # 0.2: a fifth of an epoch's steps
    what = (f"centralized {cfg.centralized.method}: {shown:g} epochs × {per_epoch} steps (batch {bs}) = "
            f"{steps:,} steps, {evals} evaluations")
    seconds = (epochs - start) / epochs * steps * step + (evals - done_evals) * evaluation
    return what + resume_note("epoch", start, epochs), seconds


def resume_note(unit: str, start: int, total: int) -> str:
    """``; resumes after <unit> <start> of <total>`` for a run whose checkpoint holds ``start`` steps."""
    return f"; resumes after {unit} {start} of {total} (its checkpoint)" if start else ""


def dry_run(path: str | None, overrides: list[str], out: str, overwrite: bool = False,
            report: str | None = None) -> str:
    """What ``python -m fedlt.simulate`` with these arguments would run and cost; nothing is trained or written.
    What the real command would refuse before training (:func:`check_plan`, ``--out``, ``--report``) it refuses
    the same way."""
    from fedlt.config import key_sources, load_config, set_given
    from fedlt.experiment import experiment_for
    from fedlt.report import check_report_dir
    from fedlt.rundir import RunDir
    from fedlt.sweep import expand, split_overrides

    combos = expand(path, overrides)
    if report:
        check_report_dir(report)
    check_out(out, create=False)
    runs = check_plan(combos, out, overwrite)
    plain, _ = split_overrides(overrides)
    given: dict[str, str] = {}
    load_config(path, plain, given)
    first, values = combos[0]
    for k, v in values.items():  # a swept key (or section) replaces what the file gave under it
        set_given(given, k, v, "sweep")
    lines = ["dry run: nothing is trained and no run directory is written", ""]
    if len(combos) > 1:
        lines.append(f"sweep of {len(combos)} combinations; the config of the first "
                     f"({', '.join(f'{k}={v}' for k, v in values.items())}):")
    lines += ["config (key = value   (where it came from)):", *config_lines(first, key_sources(first, given)), ""]
    shown, timed, total = set(), {}, 0.0
    for r in runs:
        run = RunDir(r.path)
        if run.done and run.same_config(r.cfg):
            lines.append(f"{r.path}: already finished; the command skips it")
            continue
        exp = experiment_for(r.cfg)
        if r.mode == "federated":
            key = (r.cfg.data.model_dump_json(), r.cfg.partition.model_dump_json(), r.cfg.seed)
            if key not in shown:
                shown.add(key)
                lines += partition_lines(r.cfg, exp)
        start = int(run.load_checkpoint()["step"]) if run.resumes(r.cfg) else 0
        what, seconds = run_estimate(r.mode, r.cfg, exp, timed, start)
        total += seconds
        lines.append(f"{r.path}: {what}; estimate {duration(seconds)}")
    lines += ["", (f"estimated wall time: {duration(total)} in all (from 3 timed plain SGD steps and one test-set "
                   f"evaluation of each model on this machine as loaded now, clients one after another; an estimate: "
                   f"it leaves out start-up, a method's extra work and the engine's overhead)")]
    return "\n".join(lines)


def format_table(summaries: list[dict]) -> str:
    """The final table of the runs (metrics in %), then the many/medium/few rule: ``groups: <rule>``, or where the
    runs used different rules (e.g. 10 and 100 classes), one line per rule naming its runs."""
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    labels = [s.get("run") or f"{s['mode']}:{s['method']}" for s in summaries]
    width = max([28] + [len(x) + 1 for x in labels])
    lines = [f"{'run':<{width}} {'acc':>5} {'bal':>5} {'many':>5} {'med':>5} {'few':>5} {'ECE':>5}"]
    for label, s in zip(labels, summaries):
        lines.append(f"{label:<{width}} {pct(s['accuracy'])} {pct(s['balanced_accuracy'])} {pct(s['many'])} "
                     f"{pct(s['medium'])} {pct(s['few'])} {pct(s['ece'])}")
    rules: dict[str, list[str]] = {}
    for label, s in zip(labels, summaries):
        rules.setdefault(str(s["group_rule"]), []).append(label)
    if len(rules) == 1:
        lines.append(f"groups: {next(iter(rules))}")
    else:
        lines += [f"groups of {', '.join(runs)}: {rule}" for rule, runs in rules.items()]
    return "\n".join(lines)


def list_registered() -> str:
    """``--list``: the registered parts of every registry, one line per registry."""
    from fedlt.registry import ALL

    return "\n".join(f"{r.plural}: {', '.join(r)}" for r in ALL)


def import_config_plugins(path: str | None, overrides: list[str]) -> None:
    """Import the plug-in modules ``--config`` and a ``plugins=[...]`` override name (:func:`fedlt.config.
    config_plugins`), for ``--list`` and ``--keys``, which read no other key: their parts are listed like the
    built-in ones."""
    from fedlt.config import config_plugins
    from fedlt.registry import import_plugins

    import_plugins(config_plugins(path, overrides))


def help_epilog() -> str:
    """--help's closing text: how keys are given, then every key of the schema (as ``--keys`` prints them). Where
    the plug-ins fail to load, the keys are left out and a note says why: help stays readable (it is where one
    looks on an error), and every other command gives the failure as its one-line error."""
    from fedlt.config import format_keys

    try:
        keys = ("keys (type, default, meaning; [part] keys exist only when that part is selected):\n"
                + format_keys())
    except FedLTError as exc:
        keys = f"keys: not listed, because the plug-ins failed to load (any other command says so too):\n  {exc}"
    return ("Keys are dotted paths into the config, e.g. federation.rounds=5 partition.alpha=0.1 "
            "strategy.name=fedprox strategy.mu=0.1;\nsweep.seed=[0,1] sweep.partition.alpha=[0.1,1] runs all four "
            "combinations. --keys PART shows one section or part (with --config or plugins=[module]: a plug-in's "
            "too).\n\n" + keys)


class _Once(argparse.Action):
    """An option that may be given once: ``--config a.yaml --config b.yaml`` kept the last file without a word."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        seen = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give it once")
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fedlt.simulate`` (also read by the test that checks the benchmark scripts'
    commands)."""
    parser = argparse.ArgumentParser(prog="python -m fedlt.simulate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=help_epilog())
    parser.add_argument("--config", action=_Once, help="YAML config (default: configs/default.yaml when it exists)")
    parser.add_argument("--out", default="runs", action=_Once, help="folder for the run directories (default: runs)")
    parser.add_argument("--list", action="store_true", help="list registered data sets, models, methods")
    parser.add_argument("--keys", nargs="?", const="", metavar="PART",
                        help="list every config key (name, type, default, description), or those of one section "
                             "or registered part (--keys train, --keys fedprox, --keys ldam_drw; a loss: its "
                             "client.loss_options, --keys ldam)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run directory that holds a run of another config (default: refuse)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for another run writing the same run directory to end (default: refuse)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Flower's and Ray's logs, deprecation warnings and the Ray actors' output")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config (with where each value came from), the partition, the "
                             "rounds / epochs and local steps and an estimate of the wall time; run nothing")
    parser.add_argument("--report", metavar="DIR", action=_Once,
                        help="at the end, write the comparison report of these runs into DIR (as python -m "
                             "fedlt.compare does)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", action=_Once,
                        help="run N runs of a sweep at once, each in its own process (default 1; on a GPU "
                             "several small runs share the card)")
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)  # --jobs' children: this one config into this dir
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    try:
        return _main(args, argv)
    except RunInterrupted as exc:
        cli = stop_handler_installed()
        if cli:  # from here on, a Ctrl-C changes nothing: this process ends with 130 as soon as it has said how
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{exc}", file=sys.stderr, flush=True)
        if not args.run_dir:
            print(f"interrupted; resume with:\n  {resume_command(argv)}", file=sys.stderr, flush=True)
        shutdown_ray()
        if cli:  # not through the interpreter's shutdown, which restores the default SIGINT action
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C: abort now, without waiting for the round's threads
        if not stop_handler_installed():  # main() called from Python (a test, a notebook): theirs to handle
            raise
        print("aborted (the last checkpoint stays; rerun the same command to resume from it)", file=sys.stderr,
              flush=True)
        shutdown_ray()
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)


def resume_command(argv: list[str] | None) -> str:
    """The command line that resumes this one: the same one (finished runs are skipped, the others resume
    from their checkpoints)."""
    return "python -m fedlt.simulate " + shlex.join(argv if argv is not None else sys.argv[1:])


def shutdown_ray() -> None:
    if "ray" in sys.modules:  # only where a federated run started Ray
        from fedlt.federation.runner import shutdown_ray

        shutdown_ray()


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    try:
        path = args.config
        if path is None and Path("configs/default.yaml").is_file():
            path = "configs/default.yaml"
        if args.list or args.keys is not None:  # with the plug-ins the config names, not its other keys
            import_config_plugins(path, args.overrides)
        if args.list:
            print(list_registered())
            return 0
        if args.keys is not None:
            from fedlt.config import format_keys

            print(format_keys(args.keys or None))
            return 0
        from fedlt.federation.runner import quiet_output
        from fedlt.sweep import expand

        with quiet_output(args.verbose):
            if args.dry_run:
                print(dry_run(path, args.overrides, args.out, args.overwrite, args.report))
                return 0
            if args.run_dir:  # a child of --jobs: the resolved config of one run, into its directory
                from fedlt.config import load_config

                cfg = load_config(path)
                run_one(cfg.mode, cfg, Path(args.run_dir), args.verbose, args.overwrite, args.wait)
                return 0
            combos = expand(path, args.overrides)
            if args.report:  # before any training: a report folder that cannot be written fails now
                from fedlt.report import check_report_dir

                check_report_dir(args.report)
            summaries = run_sweep(combos, args.out, args.verbose, args.jobs, args.overwrite, args.wait)
    except FedLTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClientFailure as exc:  # a client's error ended the run: its partition and traceback, no server trace
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(summaries))
    if args.report:
        from fedlt.compare import make_report
        from fedlt.sweep import plan

        return make_report([r.path for r in plan(combos, args.out)], args.report,
                           "python -m fedlt.simulate " + shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    install_stop_handler()
    sys.exit(main())
