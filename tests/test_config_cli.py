import subprocess
import sys

import pytest

from conftest import FASHION, ROOT, needs_fashion
from fedlt.config import load_config
from fedlt.simulate import main


def run_cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr()


@pytest.mark.parametrize("override,message", [
    ("foo.bar=1", "unknown config key 'foo.bar'"),
    ("partition.colour=red", "unknown config key 'partition.colour'"),
    ("federation.rounds=many", "'federation.rounds' must be int"),
    ("train.lr=fast", "'train.lr' must be float"),
    ("partition.alpha=0", "'partition.alpha' must be > 0"),
    ("partition.alpha=-1", "'partition.alpha' must be > 0"),
    ("data.imbalance_factor=0.5", "'data.imbalance_factor' must be >= 1"),
    ("federation.fraction=0", "'federation.fraction' must be > 0"),
    ("federation.fraction=1.5", "'federation.fraction' must be <= 1"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
    ("centralized.epochs=.inf", "'centralized.epochs' must be a finite number"),
    ("seed=-1", "'seed' must be >= 0"),
    ("client.mu=0.1", "not an option of client method 'fedavg'; strategy fedprox takes it as strategy.mu"),
    ("data.train_list=x.txt", "data sets cifar10_files, file_list"),
    ("strategy.name=nope", "unknown strategy 'nope'"),
    ("strategy.mu=1", "unknown config key 'strategy.mu': not an option of strategy 'fedavg'"),
    ("mode=sideways", "'mode' must be one of"),
    ("data.name=mnist", "unknown data set 'mnist'"),
])
def test_bad_config_is_a_one_line_error(capsys, override, message):
    code, out = run_cli(capsys, "--config", str(ROOT / "configs/default.yaml"), override)
    assert code == 2
    assert out.err.startswith("error: ") and message in out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


def test_missing_data_set_is_a_one_line_error(capsys, tmp_path):
    code, out = run_cli(capsys, "--out", str(tmp_path), f"data.root={tmp_path}/nowhere")
    assert code == 2 and "nowhere" in out.err and "dataset-fashion-mnist" in out.err
    assert out.err.count("\n") == 1


@needs_fashion
def test_more_clients_than_samples_is_a_one_line_error(capsys, tmp_path):
    code, out = run_cli(capsys, "--out", str(tmp_path), "partition.num_clients=20000")
    assert code == 2 and "20000" in out.err and out.err.count("\n") == 1


def test_missing_config_file(capsys):
    code, out = run_cli(capsys, "--config", "no/such.yaml")
    assert code == 2 and "no/such.yaml" in out.err


def test_real_command_line_exits_nonzero_without_traceback():
    p = subprocess.run([sys.executable, "-m", "fedlt.simulate", "partition.alpha=0"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: config key 'partition.alpha' must be > 0, got 0"


def test_list_shows_every_registry(capsys):
    code, out = run_cli(capsys, "--list")
    assert code == 0
    for word in ("fashion_mnist", "cifar10", "cifar100", "imagenet_lt", "resnet32", "small_cnn", "resnet18",
                 "fedavg", "fedprox", "fedavgm", "ce"):
        assert word in out.out


def test_overrides_and_types():
    cfg = load_config(ROOT / "configs/default.yaml", ["partition.alpha=1", "federation.rounds=3",
                                                       "strategy.name=fedprox", "strategy.mu=0.1"])
    assert cfg.partition.alpha == 1.0 and isinstance(cfg.partition.alpha, float)
    assert cfg.federation.rounds == 3
    assert cfg.client.name == "fedprox"  # the strategy brings its paired client
    assert cfg.strategy.mu == 0.1


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_keys_come_from_the_schema(capsys):
    code, out = run_cli(capsys, "--keys", "fedprox")
    assert code == 0
    line = next(x for x in out.out.splitlines() if x.startswith("strategy.mu "))
    assert "float" in line and "0.01" in line and "proximal weight" in line
    name = next(x for x in out.out.splitlines() if x.startswith("strategy.name "))
    assert "'fedprox'" in name and "'fedavg'" not in name  # the part's own name, not the section's default
    code, out = run_cli(capsys, "--keys", "nosuchpart")
    assert code == 2 and "nosuchpart" in out.err and out.err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for key in ("train.lr", "partition.alpha", "centralized.max_margin", "model.num_experts", "data.train_list"):
        assert key in help_text


def test_keys_of_a_loss_are_its_options_as_a_client_method_takes_them(capsys):
    """A loss is no config section, so ``--keys ldam`` said "no section or registered part" although
    ``client.loss=ldam`` takes options (``client.loss_options``) that nothing listed."""
    code, out = run_cli(capsys, "--keys", "ldam")
    assert code == 0
    line = next(x for x in out.out.splitlines() if x.startswith("client.loss_options.max_margin "))
    assert "float" in line and "0.5" in line and "[loss ldam]" in line and "client.loss=ldam" in line
    cfg = load_config(None, ["mode=federated", "client.name=local_loss", "client.loss=ldam",
                             "client.loss_options.max_margin=0.3"])  # the key as printed is a key the config takes
    assert cfg.client.loss_options.max_margin == 0.3
    code, out = run_cli(capsys, "--keys", "focal")  # also a centralized method: both parts' keys
    assert code == 0 and "client.loss_options.gamma " in out.out and "centralized.gamma " in out.out


def test_every_declared_key_has_a_description():
    from fedlt.config import FIXED_SECTIONS, Config
    from fedlt.registry import ALL

    models = [Config, *FIXED_SECTIONS.values()]
    models += [r.options(name) for r in ALL if r.base_options is not None for name in r]
    for options in models:
        for key, field in options.model_fields.items():
            if key in FIXED_SECTIONS or key in ("data", "model", "strategy", "client", "centralized"):
                continue  # sections, described by their own models
            assert field.description, f"{options.__name__}.{key} has no description"


def test_a_parts_own_defaults_hold_unless_set():
    from fedlt.experiment import experiment_for, model_for
    from fedlt.models.base import NormedLinear

    cfg = load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts"])
    assert (cfg.model.classifier, cfg.model.scale, cfg.model.num_experts) == ("cosine", 30.0, 3)
    assert load_config(None, ["model.name=small_cnn"]).model.classifier == "linear"
    assert load_config(None, ["model.name=small_cnn_experts", "model.classifier=linear"]).model.classifier == "linear"
    if FASHION.is_dir():
        model = model_for(cfg, experiment_for(cfg))
        assert all(isinstance(e.classifier, NormedLinear) and e.classifier.scale == 30.0 for e in model.experts)


def test_yaml_strings_that_are_numbers_are_accepted():
    # YAML 1.1 reads 1e-6 (no dot) as a string; it is a float all the same
    assert load_config(None, ["partition.alpha=1e-6"]).partition.alpha == 1e-6


@needs_fashion
def test_overrides_may_follow_an_option(capsys, tmp_path):
    """``... KEY=VALUE --report DIR KEY=VALUE``: the overrides after an option are read too (argparse's plain
    parse_args refused them: 'unrecognized arguments')."""
    code, out = run_cli(capsys, "--dry-run", "--out", str(tmp_path / "runs"), "federation.rounds=3", "--report",
                        str(tmp_path / "report"), "partition.num_clients=4", "mode=federated")
    assert code == 0, out.err
    assert "federation.rounds = 3" in out.out and "partition.num_clients = 4" in out.out
