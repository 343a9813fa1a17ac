"""Plug-in architecture: built-in registration, strategy -> paired client, third-party modules through the
``fedlt.plugins`` entry-point group, the worked example of docs/plugins.md in a Flower simulation, and the
round loop's guards on the hooks a plug-in overrides (failure policy, weights that do not fit, a missing return)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

import pytest

import fedlt.registry as registry
from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.registry import CLIENTS, STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples"
FEDERATED = ("fedavg", "fedprox", "fedavgm", "fedlc", "gbme", "posthoc_calibration", "ccvr", "creff",
             "dp_server_fixed", "dp_client_fixed")


@pytest.mark.parametrize("name", FEDERATED)
def test_every_strategy_registered_and_its_options_validate(name):
    experts = ["model.name=small_cnn_experts"] if name == "gbme" else []  # gbme refuses a model without experts
    cfg = load_config(None, [f"strategy.name={name}", *experts])
    cls = STRATEGIES.get(name)
    assert isinstance(cfg.strategy, cls.Options) and set(cls.Options.model_fields) == set(cfg.strategy.model_dump())
    assert cfg.client.name == getattr(cls, "client", "fedavg")


def test_strategy_brings_its_client_unless_overridden():
    assert load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts"]).client.name == "gbme"
    assert load_config(None, ["strategy.name=fedlc"]).client.name == "fedlc"
    cfg = load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts", "client.name=local_loss",
                             "client.loss=la"])
    assert cfg.client.model_dump() == {"name": "local_loss", "loss": "la", "loss_options": {"tau": 1.0}}
    with pytest.raises(FedLTError, match="beta_g.*strategy gbme takes it as strategy.beta_g"):
        load_config(None, ["strategy.name=fedavg", "strategy.beta_g=0.5"])


class FakeEntryPoint:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.group = name, value, registry.ENTRY_POINT_GROUP

    def load(self):
        return __import__(self.value)


def test_third_party_module_through_entry_point(monkeypatch, tmp_path):
    (tmp_path / "fedlt_fake_plugin.py").write_text(
        "from pydantic import Field\nfrom fedlt.federation.strategy import FedLTStrategy\n"
        "from fedlt.registry import STRATEGIES\n@STRATEGIES.register('fake_third_party')\nclass Fake(FedLTStrategy):\n"
        "    class Options(FedLTStrategy.Options):\n        knob: int = Field(3, description='a knob')\n")
    # (a description: the registry holds it for the rest of the process, where every key must have one)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    real = registry.entry_points

    def fake_entry_points(group=None, **kw):
        seen.append(group)
        return [*real(group=group), FakeEntryPoint("fake", "fedlt_fake_plugin")]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "fake_third_party" in STRATEGIES
    assert seen == [registry.ENTRY_POINT_GROUP]
    assert load_config(None, ["strategy.name=fake_third_party"]).strategy.knob == 3


def test_built_in_plug_ins_come_through_the_entry_points(monkeypatch):
    """fedlt never imports clients/ or strategies/ by name: stale package metadata is a clear error, not an
    empty list of strategies."""
    monkeypatch.setattr(registry, "entry_points", lambda group=None, **kw: [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(FedLTError, match="built-in plug-ins .* reinstall it with pip install -e ."):
        registry.load_plugins()


def test_docs_example_is_short_and_documented():
    src = (EXAMPLE / "global_prior_bs.py").read_text()
    assert len(src.splitlines()) < 100
    assert "global_prior_bs.py" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    """The example as a third-party distribution: a dist-info with a ``fedlt.plugins`` entry point on the path
    of this process and of the simulation's worker processes (PYTHONPATH)."""
    dist = tmp_path / "fedlt_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedlt-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedlt.plugins]\nglobal_prior_bs = global_prior_bs\n")
    paths = [str(tmp_path), str(EXAMPLE)]
    for p in paths:
        monkeypatch.syspath_prepend(p)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths + [os.environ.get("PYTHONPATH", ""), str(ROOT)]))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert any(ep.value == "global_prior_bs" for ep in importlib.metadata.entry_points(group="fedlt.plugins"))
    yield
    sys.modules.pop("global_prior_bs", None)


@needs_fashion
@pytest.mark.slow
def test_docs_example_runs_in_a_flower_simulation(example_installed, tmp_path):
    """The guide's example, found through its entry point by the server and by every Ray client actor, runs
    a Flower simulation (Fashion-MNIST-LT, so that CI runs it too)."""
    from test_federated_methods import simulate

    cfg = load_config(None, ["mode=federated", "partition.num_clients=4", "federation.rounds=2",
                             "federation.fraction=0.5", "train.local_steps=2", "model.name=small_cnn",
                             "eval.batch_size=1000", "strategy.name=global_prior_bs", "strategy.tau=0.5"])
    assert cfg.data.name == "fashion_mnist" and cfg.client.name == "global_prior_bs" and "global_prior_bs" in CLIENTS
    summary, rows = simulate(cfg, tmp_path / "run", flower=True)
    assert summary["method"] == "global_prior_bs" and summary["client"] == "global_prior_bs" and len(rows) == 2
    assert len(summary["pi_hat"]) == 10 and summary["prior_l1"] >= 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["prior_kl"] == summary["prior_kl"]


FED_CONFIGS = sorted((ROOT / "configs" / "federated").rglob("*.yaml"))


def test_federated_configs_cover_the_grid():
    from fedlt.sweep import expand

    names = {p.stem for p in FED_CONFIGS}
    assert {"gbme_cifar10_lt", "gbme_cifar100_lt", "creff_cifar10_lt"} <= names
    runs = {(c.data.name, c.data.imbalance_factor, c.partition.alpha, c.strategy.name)
            for p in FED_CONFIGS if p.stem.startswith("grid") for c, _ in expand(p)}
    for data in ("cifar10", "cifar100"):
        for imbalance in (100, 50):
            for alpha in (0.5, 1.0):
                for method in ("fedavg", "fedprox", "fedavgm", "fedlc", "gbme", "creff", "ccvr", "posthoc_calibration"):
                    assert (data, imbalance, alpha, method) in runs


@pytest.mark.parametrize("path", FED_CONFIGS, ids=lambda p: p.stem)
def test_federated_config_validates(path):
    cfg = load_config(path)
    assert cfg.mode == "federated"
    if cfg.strategy.name == "gbme":
        assert cfg.model.name.endswith("_experts") and cfg.client.name == "gbme"


# ------------------------------------------------------------------------------------------ hooks the round loop guards
TINY_FEDERATED = ["plugins=[plugins_for_tests.hooks]", "mode=federated", "data.name=tiny_synthetic",
                  "data.imbalance_factor=10", "data.crop_padding=0", "data.flip=false", "model.name=small_cnn",
                  "partition.num_clients=4", "federation.rounds=2", "train.local_steps=2", "eval.every=10"]


def tiny_federated(tmp_path: Path, name: str, *extra: str) -> tuple[dict, list[dict]]:
    """A few-second in-process run (tests/plugins_for_tests: 16×16 synthetic images): its summary and rows."""
    from fedlt.federation.inprocess import run_inprocess

    summary = run_inprocess(load_config(None, [*TINY_FEDERATED, *extra]), str(tmp_path / name))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_dry_run_says_which_runs_the_command_skips_or_resumes(tmp_path, capsys):
    """After a sweep of two runs, one finished and one stopped after its last checkpoint (no summary.json yet),
    the dry run names the finished one as skipped (no estimate) and the other as resuming after round 2 of 2:
    its estimate is its last evaluation only (it listed all runs as still to do, with the whole cost)."""
    from fedlt.simulate import main

    args = ["--out", str(tmp_path), *TINY_FEDERATED, "federation.engine=inprocess", "sweep.seed=[0,1]"]
    assert main(args) == 0
    stopped = next(tmp_path.glob("*seed1*"))
    (stopped / "summary.json").unlink()
    (stopped / "done").unlink()
    capsys.readouterr()
    assert main(["--dry-run", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line == f"{next(tmp_path.glob('*seed0*'))}: already finished; the command skips it" for line in lines)
    resumed = next(line for line in lines if line.startswith(f"{stopped}: "))
    assert "; resumes after round 2 of 2 (its checkpoint); estimate" in resumed


def test_a_strategy_overriding_aggregate_train_gets_the_failure_policy(tmp_path):
    """Flower's ``aggregate_train`` in a plug-in used to receive the failed clients' empty replies (no failure
    counted, no images trained, exit 0) where fedavg stopped at the first failure; tolerated, the failed clients
    were then listed among the round's aggregated ``clients``."""
    from fedlt.errors import ClientFailure

    failing = ["federation.failure_rate=0.5"]
    with pytest.raises(ClientFailure) as fedavg:
        tiny_federated(tmp_path, "fedavg", *failing)
    with pytest.raises(ClientFailure) as plug_in:
        tiny_federated(tmp_path, "plug-in", *failing, "strategy.name=flower_aggregate_train")
    assert str(plug_in.value) == str(fedavg.value)
    assert str(fedavg.value).startswith("client of partition 0 failed in round 1: ")

    tolerated = [*failing, "federation.max_failures=10"]
    summary, rows = tiny_federated(tmp_path, "fedavg-tolerated", *tolerated)
    plug_in_summary, plug_in_rows = tiny_federated(tmp_path, "plug-in-tolerated", *tolerated,
                                                   "strategy.name=flower_aggregate_train")
    assert summary["failures"]["total"] > 0 and plug_in_summary["failures"] == summary["failures"]
    assert [r["failed"] for r in plug_in_rows[1:]] == [r["failed"] for r in rows[1:]]
    # which clients each round aggregated: the failed ones are not among them (fedlt's aggregate_train, which the
    # plug-in does not call, used to be the only one to record them: the row listed the whole cohort)
    assert [r["clients"] for r in plug_in_rows[1:]] == [r["clients"] for r in rows[1:]]
    assert all(not {f["partition"] for f in r["failed"]} & set(r["clients"]) for r in plug_in_rows[1:])
    assert any(r["failed"] for r in plug_in_rows[1:])
    assert plug_in_summary["train_images"] == summary["train_images"] > 0


@pytest.mark.parametrize("change,problem", [
    ("drop", r"lack the global model's key 'classifier\.weight' \(shape \[10, \d+\]\)"),
    ("flatten", r"hold key 'classifier\.weight' in shape \[\d+\], the global model's is \[10, \d+\]")])
def test_client_weights_that_do_not_fit_the_model_stop_the_run_in_one_line(tmp_path, change, problem):
    """A client method that drops a key of the model or changes its shape: a chained traceback from the
    server's ``load_state_dict`` (or, where another client sent the key, a silently skewed average)."""
    with pytest.raises(FedLTError) as e:
        tiny_federated(tmp_path, change, "client.name=misfit_client", f"client.change={change}")
    assert re.fullmatch(f"partition 1, round 1: the weights client method misfit_client sent {problem}", str(e.value))


def test_an_aggregate_checked_without_return_stops_the_run_in_one_line(tmp_path):
    with pytest.raises(FedLTError) as e:
        tiny_federated(tmp_path, "run", "strategy.name=forgets_return")
    assert str(e.value) == ("strategy forgets_return: ForgetsReturn.aggregate_checked returned None, not the pair "
                            "(arrays, metrics) of the round's aggregate: an override of aggregate_checked must return "
                            "it (e.g. return super().aggregate_checked(...))")


def test_a_client_methods_round_metrics_reach_metrics_jsonl(tmp_path):
    """``round_metrics`` (here each client's number of local classes) reached the strategy but not the run's
    records: each round's row now holds the strategy's aggregate of it, by default the mean over the round's
    clients weighted by their examples, under ``clients/`` (a method's ``accuracy`` cannot shadow the test's)."""
    import numpy as np

    _, rows = tiny_federated(tmp_path, "run", "client.name=local_classes_client", "federation.rounds=2")
    counts = np.array(json.loads((tmp_path / "run" / "partition.json").read_text())["client_class_counts"])
    for row in rows[1:]:
        cohort = counts[row["clients"]]
        sizes, classes = cohort.sum(1), (cohort > 0).sum(1)
        assert len(set(classes.tolist())) > 1  # clients of different numbers of classes, or the test shows nothing
        assert row["clients/local-classes"] == pytest.approx(float(np.dot(sizes, classes) / sizes.sum()))
        assert not any(k.startswith("clients/") for k in row if k != "clients/local-classes")  # no bookkeeping
    assert "clients/local-classes" not in rows[0]


def test_the_aggregation_example_of_the_plugin_guide_runs(message_identity):
    """docs/plugins.md's coordinate-wise median, taken from the guide's text and run on three replies: what it
    shows works as written (the base's metrics, the median of every array, integer buffers kept)."""
    import textwrap

    import torch
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlt.federation.records import to_arrays, to_state
    from fedlt.federation.strategy import FedLTStrategy

    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "median" in b)
    namespace = {"torch": torch, "to_state": to_state, "to_arrays": to_arrays, "FedLTStrategy": FedLTStrategy}
    exec("class Median(FedLTStrategy):\n" + textwrap.indent(textwrap.dedent(block), "    "), namespace)
    strategy = namespace["Median"](load_config(None, ["mode=federated"]), 3)

    def reply(pid: int, state: dict) -> Message:
        content = RecordDict({"arrays": to_arrays(state),
                              "metrics": MetricRecord({"partition-id": pid, "num-examples": 10 * (pid + 1)})})
        return Message(content=content, reply_to=Message(content=content, dst_node_id=1, message_type="train"))

    states = [{"w": torch.tensor([1.0, 9.0]), "n": torch.tensor(3)}, {"w": torch.tensor([5.0, 2.0]),
              "n": torch.tensor(7)}, {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(1)}]
    arrays, metrics = strategy.aggregate_checked(1, [reply(i, s) for i, s in enumerate(states)])
    median = to_state(arrays)
    assert median["w"].tolist() == [4.0, 2.0] and median["n"].item() == 3 and median["n"].dtype == torch.int64
    assert metrics is not None  # the base's aggregated metrics, passed on


def test_the_hook_table_of_the_plugin_guide_names_every_builtin_strategy_that_overrides_a_hook():
    """docs/plugins.md's hook table: its "used by" column names each built-in strategy whose own class (not
    :class:`StrategyWrapper`'s delegation) overrides the hook, so that a reader looking for an example finds
    them all."""
    from fedlt.federation.compose import StrategyWrapper
    from fedlt.federation.strategy import FedLTStrategy

    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)\(.*?\)` \| .*? \| (.*) \|$", guide, re.M)}
    hooks = ("setup", "train_config", "client_records", "run_round", "eval_model", "transform_logits")
    assert set(hooks) <= set(rows)

    def squash(text: str) -> str:
        return re.sub(r"[^a-z]", "", text.lower())

    missing = []
    for name in STRATEGIES:
        cls = STRATEGIES.get(name)
        if not cls.__module__.startswith("strategies."):  # a plug-in of another test
            continue
        own = [k for k in cls.__mro__[:cls.__mro__.index(FedLTStrategy)] if k is not StrategyWrapper]
        for hook in hooks:
            if any(hook in vars(k) for k in own) and squash(name) not in squash(rows[hook]):
                missing.append(f"{hook}: {name}")
    assert not missing, missing
