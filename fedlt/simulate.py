"""``python -m fedlt.simulate``: run one config (federated, centralized or both) into run directories.

    python -m fedlt.simulate [--config FILE] [--out DIR] [--overwrite] [--wait] [KEY=VALUE ...] [sweep.KEY=[V1,V2,...] ...]
    python -m fedlt.simulate --list

A ``sweep:`` mapping in the config (or ``sweep.KEY=[...]`` overrides) runs every combination of the
listed values, each into its own run directory; finished runs are skipped (see fedlt/sweep.py).

A run directory (``<out>/<name>-seed<seed>-fed-<strategy>`` …) that holds a run of another config, finished
or not, is refused before anything runs (a one-line error naming the first differing key) unless
``--overwrite`` is given; a directory another run is writing is refused (or, with ``--wait``, waited for).
A client failure that ends a federated run prints the client's partition id and traceback and exits 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from fedlt.config import Config
from fedlt.errors import ClientFailure, FedLTError


def check_data(cfgs: list[Config]) -> None:
    """Build the data of every distinct data/partition/seed once: fail early on missing data or an
    impossible partition, before any run starts."""
    from fedlt.experiment import experiment_for

    seen = set()
    for cfg in cfgs:
        exp = experiment_for(cfg)
        line = (f"data: {cfg.data.name} long-tailed (IF={cfg.data.imbalance_factor:g}): {len(exp.train)} "
                f"train / {len(exp.test)} test, {exp.num_classes} classes; {cfg.partition.num_clients} clients "
                f"({cfg.partition.method}, alpha={cfg.partition.alpha:g})")
        if line not in seen:
            seen.add(line)
            print(line, flush=True)


def run_config(cfg: Config, out: str, verbose: bool = False, overwrite: bool = False) -> list[dict]:
    """Run every part of ``cfg``; a finished run directory with the same config is skipped."""
    return run_sweep([(cfg, {})], out, verbose, overwrite)


def run_sweep(combos: list[tuple[Config, dict]], out: str, verbose: bool = False, overwrite: bool = False,
              wait: bool = False) -> list[dict]:
    """Run the distinct runs of validated sweep combinations (see :mod:`fedlt.sweep`) one after another;
    a finished run directory with the same config is skipped, an unfinished one resumes. A directory of
    another config is a :class:`FedLTError` before any run starts, unless ``overwrite`` (then it is emptied
    first). Each run holds its directory's lock (``wait``: wait for another run to release it)."""
    import json

    from fedlt.centralized import run_centralized
    from fedlt.federation.runner import run_federated
    from fedlt.rundir import RunDir
    from fedlt.sweep import plan

    runs = plan(combos, out)
    if not overwrite:
        for r in runs:
            if r.path.is_dir():
                RunDir(r.path).check_config(r.cfg)
    check_data([c for c, _ in combos])
    summaries = []
    for i, r in enumerate(runs, 1):
        mode, c, path = r.mode, r.cfg, r.path
        count = f" ({i}/{len(runs)})" if len(combos) > 1 else ""
        label = {"run": path.name} if len(combos) > 1 else {}
        run = RunDir(path)
        with run.lock(wait):
            if run.done and run.same_config(c):
                print(f"[{mode}] {path} already finished; skipped{count}", flush=True)
                summaries.append({**json.loads((path / "summary.json").read_text()), **label})
                continue
            if overwrite and run.config_conflict(c):
                print(f"[{mode}] --overwrite: removing the run of another config in {path}", flush=True)
                run.clear()
            t0 = time.time()
            s = run_federated(c, str(path), verbose) if mode == "federated" else run_centralized(c, run)
        print(f"[{mode}] finished in {time.time() - t0:.1f}s -> {path}{count}", flush=True)
        summaries.append({**s, **label})
    return summaries


def format_table(summaries: list[dict]) -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    labels = [s.get("run") or f"{s['mode']}:{s['method']}" for s in summaries]
    width = max([28] + [len(x) + 1 for x in labels])
    lines = [f"{'run':<{width}} {'acc':>5} {'bal':>5} {'many':>5} {'med':>5} {'few':>5} {'ECE':>5}"]
    for label, s in zip(labels, summaries):
        lines.append(f"{label:<{width}} {pct(s['accuracy'])} {pct(s['balanced_accuracy'])} {pct(s['many'])} "
                     f"{pct(s['medium'])} {pct(s['few'])} {pct(s['ece'])}")
    if summaries:
        lines.append(f"groups: {summaries[0]['group_rule']}")
    return "\n".join(lines)


def list_registered() -> str:
    from fedlt.registry import ALL

    return "\n".join(f"{r.plural}: {', '.join(r)}" for r in ALL)


def help_epilog() -> str:
    """--help's closing text: how keys are given, then every key of the schema (as ``--keys`` prints them)."""
    from fedlt.config import format_keys

    return ("Keys are dotted paths into the config, e.g. federation.rounds=5 partition.alpha=0.1 "
            "strategy.name=fedprox strategy.mu=0.1;\nsweep.seed=[0,1] sweep.partition.alpha=[0.1,1] runs all four "
            "combinations. --keys PART shows one section or part.\n\nkeys (type, default, meaning; [part] keys "
            "exist only when that part is selected):\n" + format_keys())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt.simulate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=help_epilog())
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml when it exists)")
    parser.add_argument("--out", default="runs", help="folder for the run directories (default: runs)")
    parser.add_argument("--list", action="store_true", help="list registered data sets, models, methods")
    parser.add_argument("--keys", nargs="?", const="", metavar="PART",
                        help="list every config key (name, type, default, description), or those of one section "
                             "or registered part (--keys train, --keys fedprox, --keys ldam_drw)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run directory that holds a run of another config (default: refuse)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for another run writing the same run directory to end (default: refuse)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--report", metavar="DIR", help="at the end, write the comparison report of these runs "
                                                         "into DIR (as python -m fedlt.compare does)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(list_registered())
            return 0
        if args.keys is not None:
            from fedlt.config import format_keys

            print(format_keys(args.keys or None))
            return 0
        from fedlt.sweep import expand

        path = args.config
        if path is None and Path("configs/default.yaml").is_file():
            path = "configs/default.yaml"
        combos = expand(path, args.overrides)
        summaries = run_sweep(combos, args.out, args.verbose, args.overwrite, args.wait)
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
    sys.exit(main())
