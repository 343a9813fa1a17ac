"""Configs build on configs (``base:``), every key says where its value came from, and what a run runs is named
by its strategy and, where it is not the strategy's own, its client method."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlt.config import dump_config, federated_method, key_sources, load_config
from fedlt.errors import FedLTError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_config_overrides_only_what_differs_from_its_base(tmp_path):
    write(tmp_path / "base.yaml", "name: base\ndata: {name: fashion_mnist, crop_padding: 2, imbalance_factor: 50}\n"
                                  "federation: {rounds: 7, lr_milestones: [3, 5]}\n")
    child = write(tmp_path / "sub" / "child.yaml",
                  "base: ../base.yaml\nname: child\ndata: {imbalance_factor: 10}\nfederation: {lr_milestones: [4]}\n")
    cfg = load_config(child)
    assert cfg.name == "child"
    assert cfg.data.crop_padding == 2  # the base's value, not the built-in default 4
    assert cfg.data.imbalance_factor == 10  # mappings merge key by key
    assert cfg.federation.rounds == 7
    assert cfg.federation.lr_milestones == [4]  # lists replace
    assert "base" not in dump_config(cfg)


def test_bases_chain_and_overrides_win(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\ntrain: {lr: 0.5, batch_size: 16}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {lr: 0.25}\n")
    c = write(tmp_path / "c.yaml", "base: b.yaml\nseed: 3\n")
    given: dict[str, str] = {}
    cfg = load_config(c, ["train.batch_size=8"], provenance=given)
    assert (cfg.seed, cfg.train.lr, cfg.train.batch_size) == (3, 0.25, 8)
    sources = key_sources(cfg, given)
    assert sources["seed"] == "file c.yaml"
    assert sources["train.lr"] == "file b.yaml"
    assert sources["train.batch_size"] == "override"
    assert sources["train.momentum"] == "default"


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: a.yaml\n"}, "cycle (a.yaml -> a.yaml)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "cycle (a.yaml -> b.yaml -> a.yaml)"),
    ({"a.yaml": "base: nowhere.yaml\n"}, "base 'nowhere.yaml' not found"),
    ({"a.yaml": "base: [x]\n"}, "'base' must name a config file"),
    ({"a.yaml": "base: sub\n", "sub/b.yaml": ""}, "base 'sub' is a folder, not a config file"),  # was "not found"
])
def test_a_bad_base_is_a_one_line_error(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(FedLTError) as err:
        load_config(tmp_path / "a.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_shipped_configs_that_build_on_others_keep_their_recipe():
    c10, c100 = load_config(ROOT / "configs/cifar10_lt.yaml"), load_config(ROOT / "configs/cifar100_lt.yaml")
    assert c100.data.name == "cifar100" and c100.name == "cifar100_lt_if100"
    assert c100.replace(name="x", data=c10.data) == c10.replace(name="x")


def test_every_key_says_where_its_value_came_from():
    given: dict[str, str] = {}
    cfg = load_config(ROOT / "configs/default.yaml", ["strategy.name=fedavgm", "client.name=local_loss"], given)
    sources = key_sources(cfg, given)
    assert sources["partition.alpha"] == "file default.yaml"
    assert sources["strategy.name"] == sources["client.name"] == "override"
    assert sources["strategy.momentum"] == "default of strategy fedavgm"
    assert sources["client.loss"] == "default of client method local_loss"
    assert sources["eval.batch_size"] == "default"
    assert set(sources) >= {"data.root", "model.classifier", "centralized.epochs"}
    derived = key_sources(load_config(None, ["strategy.name=fedprox", "data.name=fashion_mnist"], (g := {})), g)
    assert derived["client.name"] == "derived from strategy fedprox"
    assert derived["model.name"] == "derived from data set fashion_mnist"


def test_local_epochs_and_local_steps_together_are_an_error(tmp_path):
    with pytest.raises(FedLTError, match="'train.local_epochs' and 'train.local_steps' are both set"):
        load_config(None, ["train.local_epochs=2", "train.local_steps=5"])
    f = write(tmp_path / "c.yaml", "train: {local_epochs: 2}\n")
    with pytest.raises(FedLTError, match="both set"):
        load_config(f, ["train.local_steps=5"])
    assert load_config(f, ["train.local_epochs=null", "train.local_steps=5"]).train.local_steps == 5
    # the shipped default leaves local_epochs at its default, so steps can be asked for on the command line
    assert load_config(ROOT / "configs/default.yaml", ["train.local_steps=5"]).train.local_steps == 5


@pytest.mark.parametrize("overrides, method", [
    (["strategy.name=fedavg"], "fedavg"),
    (["strategy.name=fedprox"], "fedprox"),  # its own client
    (["strategy.name=fedavg", "client.name=fedprox"], "fedavg+fedprox"),
    (["strategy.name=fedavg", "client.name=local_loss", "client.loss=la"], "fedavg+la"),
    (["strategy.name=gbme", "model.name=small_cnn_experts", "client.name=local_loss", "client.loss=la"], "gbme+la"),
    (["strategy.name=posthoc_calibration", "strategy.base=fedprox"], "posthoc_calibration+fedprox"),
])
def test_a_run_is_named_by_its_strategy_and_a_client_method_not_its_own(overrides, method):
    assert federated_method(load_config(None, overrides)) == method
