"""Sweeps: expansion, run names, deduplication, validation and skipping finished runs (no training)."""

from __future__ import annotations

import re

import pytest

from fedlt import simulate
from fedlt.errors import FedLTError
from fedlt.rundir import RunDir
from fedlt.sweep import expand, plan


def names(runs):
    return [r.path.name for r in runs]


def test_product_of_lists_and_names(tmp_path):
    combos = expand(None, ["name=d", "sweep.seed=[0,1]", "sweep.partition.alpha=[0.1,1.0]"])
    assert [v for _, v in combos] == [{"seed": s, "partition.alpha": a} for s in (0, 1) for a in (0.1, 1.0)]
    for cfg, v in combos:
        assert cfg.seed == v["seed"] and cfg.partition.alpha == v["partition.alpha"]
        assert "sweep" not in cfg
    runs = plan(combos, tmp_path)
    assert names(runs) == ["d-seed0-alpha0.1-fed-fedavg", "d-seed0-cen-ce", "d-seed0-alpha1-fed-fedavg",
                           "d-seed1-alpha0.1-fed-fedavg", "d-seed1-cen-ce", "d-seed1-alpha1-fed-fedavg"]
    assert [r.mode for r in runs].count("centralized") == 2  # the centralized run ignores α: deduplicated
    assert all(r.cfg.mode == r.mode for r in runs)


def test_yaml_sweep_nested_or_dotted_and_strategy_pairing(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\nmode: federated\nsweep:\n  strategy.name: [fedavg, fedprox]\n"
                 "  data:\n    imbalance_factor: [10, 100]\n")
    combos = expand(f, [])
    assert len(combos) == 4
    runs = plan(combos, tmp_path)
    assert names(runs) == ["y-seed0-if10-fed-fedavg", "y-seed0-if100-fed-fedavg", "y-seed0-if10-fed-fedprox",
                           "y-seed0-if100-fed-fedprox"]
    # each combination is resolved from scratch: fedprox gets its own client method and options
    prox = runs[2].cfg
    assert prox.client.name == "fedprox" and prox.strategy.mu == 0.01
    assert runs[0].cfg.client.name == "fedavg" and not hasattr(runs[0].cfg.strategy, "mu")


def test_a_plain_override_of_a_swept_key_replaces_that_axis(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\nmode: federated\nsweep:\n  strategy.name: [fedavg, fedprox]\n  seed: [0, 1]\n")
    assert [v for _, v in expand(f, ["strategy.name=fedlc"])] == [{"seed": 0}, {"seed": 1}]
    assert {c.strategy.name for c, _ in expand(f, ["strategy.name=fedlc"])} == {"fedlc"}
    assert [v for _, v in expand(f, ["strategy={name: fedlc}", "seed=3"])] == [{}]  # a whole section fixes it too
    # a sweep.KEY override still replaces the file's axis
    assert [v["strategy.name"] for _, v in expand(f, ["seed=0", "sweep.strategy.name=[fedlc]"])] == ["fedlc"]


def test_federated_run_deduplicated_over_centralized_keys(tmp_path):
    runs = plan(expand(None, ["name=d", "sweep.centralized.epochs=[1,2]"]), tmp_path)
    assert names(runs) == ["d-seed0-fed-fedavg", "d-seed0-epochs1-cen-ce", "d-seed0-epochs2-cen-ce"]


def test_centralized_run_deduplicated_over_federated_only_eval_keys(tmp_path):
    """eval.local / eval.finetune_epochs are read by federated runs only: a sweep over them trained the same
    centralized run twice, and a finished centralized run was refused as "another config" when they changed."""
    runs = plan(expand(None, ["name=d", "mode=both", "sweep.eval.local=['off', final]"]), tmp_path)
    assert names(runs) == ["d-seed0-localoff-fed-fedavg", "d-seed0-cen-ce", "d-seed0-localfinal-fed-fedavg"]
    (centralized,) = [r for r in runs if r.mode == "centralized"]
    run = RunDir(centralized.path)
    run.write_config(centralized.cfg)
    later = expand(None, ["name=d", "mode=centralized", "eval.local=final", "eval.finetune_epochs=2"])[0][0]
    assert run.same_config(later) and not run.same_config(later.replace(seed=1))


@pytest.mark.parametrize("overrides, expected", [
    # an IID partition reads no α; a Dirichlet one no shards_per_client
    (["partition.method=iid", "sweep.partition.alpha=[0.1,0.5]"], ["d-seed0-fed-fedavg", "d-seed0-cen-ce"]),
    (["sweep.partition.shards_per_client=[2,5]"], ["d-seed0-fed-fedavg", "d-seed0-cen-ce"]),
    (["partition.method=shards", "sweep.partition.shards_per_client=[2,5]"],
     ["d-seed0-shards_per_client2-fed-fedavg", "d-seed0-cen-ce", "d-seed0-shards_per_client5-fed-fedavg"]),
    # data.profile=none cuts nothing: β is unread by either mode
    (["data.profile=none", "sweep.data.imbalance_factor=[10,100]"], ["d-seed0-fed-fedavg", "d-seed0-cen-ce"]),
    # a centralized run trains centralized.epochs, not the clients' local epochs or steps
    (["sweep.train.local_epochs=[1,2]"], ["d-seed0-local_epochs1-fed-fedavg", "d-seed0-cen-ce",
                                          "d-seed0-local_epochs2-fed-fedavg"]),
])
def test_a_key_the_run_does_not_read_makes_no_second_run(tmp_path, overrides, expected):
    """A sweep over a key one mode or one partition method does not read trained the same run twice, named apart
    by a value it never used (the report then showed two rows of the same numbers)."""
    runs = plan(expand(None, ["name=d", "mode=both", *overrides]), tmp_path)
    assert names(runs) == expected


def test_a_finished_run_is_the_run_of_a_config_that_differs_only_where_it_does_not_read(tmp_path):
    (run_cfg, _), = expand(None, ["name=d", "mode=federated", "partition.method=iid", "partition.alpha=0.5"])
    run = RunDir(tmp_path / "r")
    run.write_config(run_cfg)
    assert run.same_config(run_cfg.replace(partition=run_cfg.partition.model_copy(update={"alpha": 0.1})))
    assert not run.same_config(run_cfg.replace(partition=run_cfg.partition.model_copy(
        update={"alpha": 0.1, "method": "dirichlet"})))


def test_no_sweep_is_the_plain_config(tmp_path):
    runs = plan(expand(None, ["name=p"]), tmp_path)
    assert names(runs) == ["p-seed0-fed-fedavg", "p-seed0-cen-ce"]
    assert "sweep" not in runs[0].cfg


@pytest.mark.parametrize("item, message", [
    ("sweep.partition.alpha=[0.5,-1]", "sweep combination partition.alpha=-1: config key 'partition.alpha' must be > 0"),
    ("sweep.seed=3", "sweep key 'seed' must list at least one value"),
    ("sweep.seed=[]", "sweep key 'seed' must list at least one value"),
    ("sweep.partition.nope=[1]", "sweep combination partition.nope=1: unknown config key 'partition.nope'"),
    ("sweep.strategy.name=[fedavg,nosuch]", "sweep combination strategy.name=nosuch"),
])
def test_validation_error_before_training(item, message, tmp_path, monkeypatch, capsys):
    with pytest.raises(FedLTError, match="^" + re.escape(message)):
        expand(None, [item])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(simulate, "run_sweep", lambda *a, **k: pytest.fail("ran before validating the sweep"))
    assert simulate.main(["--out", str(tmp_path / "runs"), item]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message[:20])


def fake_runners(monkeypatch, calls):
    """Runners that write a finished run directory the way the real ones do, and count their calls."""
    import fedlt.centralized
    import fedlt.federation.runner

    def finish(cfg, run):
        calls.append(run.path.name)
        run.write_config(cfg)
        summary = {"mode": cfg.mode, "method": "x", "seed": cfg.seed, "accuracy": 0.5,
                   "balanced_accuracy": 0.5, "many": 0.5, "medium": 0.5, "few": 0.5, "ece": 0.1, "group_rule": "g",
                   "config_digest": run.config_digest()}
        run.write_summary(summary)
        return summary

    monkeypatch.setattr(fedlt.federation.runner, "run_federated",
                        lambda cfg, path, verbose=False: finish(cfg, RunDir(path)))
    monkeypatch.setattr(fedlt.centralized, "run_centralized", finish)
    monkeypatch.setattr(simulate, "check_data", lambda cfgs: None)


def test_finished_runs_skipped_and_unfinished_rerun(tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    fake_runners(monkeypatch, calls)
    monkeypatch.chdir(tmp_path)
    args = ["--out", "runs", "name=s", "sweep.seed=[0,1]", "sweep.partition.alpha=[0.1,1]"]
    assert simulate.main(args) == 0
    assert len(calls) == 6 and len(set(calls)) == 6
    assert simulate.main(args) == 0  # a restart redoes nothing
    assert len(calls) == 6
    assert capsys.readouterr().out.count("already finished; skipped") == 6
    (tmp_path / "runs" / "s-seed1-alpha1-fed-fedavg" / "done").unlink()  # interrupted before the end
    assert simulate.main(args) == 0
    assert calls[6:] == ["s-seed1-alpha1-fed-fedavg"]
    assert simulate.main(args + ["federation.rounds=7", "--overwrite"]) == 0  # a changed config is not "finished"
    assert {c for c in calls[:6] if "-fed-" in c} <= set(calls[7:])
    cfg = (tmp_path / "runs" / "s-seed0-cen-ce" / "config.yaml").read_text()
    assert "sweep" not in cfg and "seed: 0" in cfg and "mode: centralized" in cfg


def test_report_of_exactly_these_runs(tmp_path, monkeypatch):
    import fedlt.compare

    fake_runners(monkeypatch, [])
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(fedlt.compare, "make_report",
                        lambda paths, out, command: seen.update(paths=[p.name for p in paths], out=out) or 0)
    assert simulate.main(["--out", "runs", "name=r", "sweep.seed=[0,1]", "--report", "runs/report"]) == 0
    assert seen == {"paths": ["r-seed0-fed-fedavg", "r-seed0-cen-ce", "r-seed1-fed-fedavg", "r-seed1-cen-ce"],
                    "out": "runs/report"}
