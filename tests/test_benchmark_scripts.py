"""The shell scripts that regenerate docs/results.md and the example report run for an hour and are run by
hand, so a config they give that fedlt has come to refuse goes unnoticed until someone needs the table
(benchmarks/federated_table.sh was broken that way from adb5436 to ca86c4b, unseen). Each script runs here with ``PY`` a stub that
records its commands, and every ``python -m fedlt.simulate`` and ``benchmarks/centralized_table.py`` command
is checked as the real one checks it before training: every sweep combination resolved and validated, plug-ins
imported from the ``PYTHONPATH`` the script gives. Nothing is trained; data files are not needed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlt.errors import FedLTError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("docs/**/*.sh")])
RECORD = "import json, os, sys; open(os.environ['FEDLT_CALLS'], 'a').write(json.dumps({'argv': sys.argv[1:], " \
         "'pythonpath': os.environ.get('PYTHONPATH', '')}) + '\\n')"


def recorded_calls(script: Path, tmp_path: Path) -> list[dict]:
    """The Python commands ``script`` runs, in order, with ``PY`` a stub that only records them."""
    stub, calls = tmp_path / "py", tmp_path / "calls.jsonl"
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "$FEDLT_RECORD" "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PY": str(stub), "FEDLT_CALLS": str(calls), "FEDLT_RECORD": RECORD}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def centralized_table():
    spec = importlib.util.spec_from_file_location("centralized_table", ROOT / "benchmarks/centralized_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_call(call: dict, out: Path) -> str:
    """Validate one recorded command as the real command does before training; what it was. The data checks
    (:func:`fedlt.simulate.check_data`: partition, local steps, crop size, a method's model keys) run for the
    configs on Fashion-MNIST, which the install step provides; a config on other data is resolved and validated
    without its data, which CI does not have."""
    from fedlt.simulate import build_parser, check_data, import_config_plugins
    from fedlt.sweep import expand, plan

    argv = call["argv"]
    if argv[:2] == ["-m", "fedlt.simulate"]:
        args = build_parser().parse_intermixed_args(argv[2:])
        path = args.config or "configs/default.yaml"
        import_config_plugins(path, args.overrides)
        combos = expand(path, args.overrides)
        plan(combos, str(out))
        cfgs = [c for c, _ in combos]
    elif argv[:2] == ["-m", "fedlt.compare"]:
        return "compare"
    elif argv and argv[0] == "benchmarks/centralized_table.py":
        table = centralized_table()
        args = table.build_parser().parse_args(argv[1:])
        seeds = [int(s) for s in args.seeds.split(",")]
        cfgs = [table.config_for(m, seed, args.overrides) for m in args.methods.split(",") for seed in seeds]
    else:
        raise AssertionError(f"a command this test does not know how to check: {argv}")
    check_data([c for c in cfgs if c.data.name == "fashion_mnist"])
    return f"{argv[1] if argv[0] == '-m' else argv[0]}: {len(cfgs)} runs"


def check_script(script: Path, tmp_path: Path) -> list[str]:
    """Record ``script``'s commands and check each (cwd: the repository root, plug-ins from the script's
    PYTHONPATH); a refused one raises :class:`FedLTError` naming the command. What each was, one line each."""
    calls = recorded_calls(script, tmp_path)
    assert any(c["argv"][:2] == ["-m", "fedlt.simulate"] or "centralized_table.py" in c["argv"][0] for c in calls)
    os.chdir(ROOT)
    lines = []
    for call in calls:
        for entry in filter(None, call["pythonpath"].split(os.pathsep)):
            sys.path.insert(0, str((ROOT / entry).resolve()))
        try:
            lines.append(check_call(call, tmp_path / "runs"))
        except FedLTError as exc:
            raise FedLTError(f"{script.name}: {' '.join(call['argv'])}\n  is refused: {exc}") from exc
    return lines


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_of_the_script_is_a_valid_config(script: Path, tmp_path: Path) -> None:
    # in a fresh interpreter: a plug-in the script names may be registered here already by another test
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, __file__, str(script), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_refused_command_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is the real one: the combination that broke federated_table.sh (local_loss under the default
    config's FedLC sweep) is refused."""
    monkeypatch.chdir(ROOT)
    call = {"argv": ["-m", "fedlt.simulate", "--out", str(tmp_path), "mode=federated", "client.name=local_loss",
                     "client.loss=balanced_softmax"], "pythonpath": ""}
    with pytest.raises(FedLTError, match="fedlc"):
        check_call(call, tmp_path)


if __name__ == "__main__":  # python tests/test_benchmark_scripts.py SCRIPT TMPDIR
    Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
    try:
        print("\n".join(check_script(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())))
    except FedLTError as exc:
        sys.exit(f"error: {exc}")
