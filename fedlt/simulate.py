"""``python -m fedlt.simulate``: run one config (federated, centralized or both) into run directories.

    python -m fedlt.simulate [--config FILE] [--out DIR] [KEY=VALUE ...]
    python -m fedlt.simulate --list
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from fedlt.errors import FedLTError


def run_dirs(cfg: dict, out: str) -> list[tuple[str, dict, Path]]:
    """(mode, config of that run, run directory) for each run that ``cfg`` asks for."""
    runs = []
    if cfg["mode"] in ("federated", "both"):
        c = copy.deepcopy(cfg)
        c["mode"] = "federated"
        runs.append(("federated", c, Path(out) / f"{cfg['name']}-fed-{cfg['strategy']['name']}"))
    if cfg["mode"] in ("centralized", "both"):
        c = copy.deepcopy(cfg)
        c["mode"] = "centralized"
        runs.append(("centralized", c, Path(out) / f"{cfg['name']}-cen-{cfg['centralized']['method']}"))
    return runs


def run_config(cfg: dict, out: str, verbose: bool = False) -> list[dict]:
    """Run every part of ``cfg``; a finished run directory with the same config is skipped."""
    from fedlt.centralized import run_centralized
    from fedlt.experiment import experiment_for
    from fedlt.federation.runner import run_federated
    from fedlt.rundir import RunDir

    exp = experiment_for(cfg)  # fail early on missing data or an impossible partition
    print(f"data: {cfg['data']['name']} long-tailed (IF={cfg['data']['imbalance_factor']:g}): {len(exp.train)} train / "
          f"{len(exp.test)} test, {exp.num_classes} classes; {cfg['partition']['num_clients']} clients "
          f"({cfg['partition']['method']}, alpha={cfg['partition']['alpha']:g})", flush=True)
    summaries = []
    for mode, c, path in run_dirs(cfg, out):
        run = RunDir(path)
        if run.done and run.same_config(c):
            print(f"[{mode}] {path} already finished; skipped", flush=True)
            import json
            summaries.append(json.loads((path / "summary.json").read_text()))
            continue
        t0 = time.time()
        s = run_federated(c, str(path), verbose) if mode == "federated" else run_centralized(c, run)
        print(f"[{mode}] finished in {time.time() - t0:.1f}s -> {path}", flush=True)
        summaries.append(s)
    return summaries


def format_table(summaries: list[dict]) -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    lines = [f"{'run':<28} {'acc':>5} {'bal':>5} {'many':>5} {'med':>5} {'few':>5} {'ECE':>5}"]
    for s in summaries:
        label = f"{s['mode']}:{s['method']}"
        lines.append(f"{label:<28} {pct(s['accuracy'])} {pct(s['balanced_accuracy'])} {pct(s['many'])} "
                     f"{pct(s['medium'])} {pct(s['few'])} {pct(s['ece'])}")
    if summaries:
        lines.append(f"groups: {summaries[0]['group_rule']}")
    return "\n".join(lines)


def list_registered() -> str:
    from fedlt.registry import ALL

    return "\n".join(f"{r.plural}: {', '.join(r)}" for r in ALL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt.simulate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Keys are dotted paths into the config, e.g. federation.rounds=5 "
                                            "partition.alpha=0.1 strategy.name=fedprox strategy.mu=0.1")
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml when it exists)")
    parser.add_argument("--out", default="runs", help="folder for the run directories (default: runs)")
    parser.add_argument("--list", action="store_true", help="list registered data sets, models, methods")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(list_registered())
            return 0
        from fedlt.config import load_config

        path = args.config
        if path is None and Path("configs/default.yaml").is_file():
            path = "configs/default.yaml"
        cfg = load_config(path, args.overrides)
        summaries = run_config(cfg, args.out, args.verbose)
    except FedLTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
