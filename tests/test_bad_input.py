"""Bad input, as a hostile user would give it (issue 12): every one ends with a one-line error and exit status 2,
names the key or file and the rule, shows no traceback and leaves no summary.json that looks finished."""

import gzip
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, needs_fashion
from fedlt.config import federated_method, key_sources, load_config
from fedlt.errors import FedLTError
from fedlt.rundir import RunDir
from fedlt.simulate import main

DEFAULT = str(ROOT / "configs/default.yaml")
TINY = ["data.profile=none", "train.batch_size=32", "partition.num_clients=2", "partition.min_size=1"]
TINY_CENTRAL = ["mode=centralized", "centralized.epochs=2", *TINY]


def refused(capsys, tmp_path, *args: str, config: str | None = DEFAULT) -> str:
    """Run the CLI; assert exit status 2, one line on stderr, no traceback, no summary.json; return the line."""
    out = tmp_path / "runs"
    code = main([*(["--config", config] if config else []), *([] if "--out" in args else ["--out", str(out)]), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("summary.json"))
    return err.strip()


# ------------------------------------------------------------------------------------------ the config
@pytest.mark.parametrize("overrides,message", [
    (["train.lr=.nan"], "config key 'train.lr' must be a finite number, got nan"),
    (["train.lr=.inf"], "config key 'train.lr' must be a finite number, got inf"),
    (["centralized.epochs=.inf"], "config key 'centralized.epochs' must be a finite number, got inf"),
    (["train.local_steps=-5"], "config key 'train.local_steps' must be > 0, got -5"),
    (["strategy.name=fedprox", "strategy.mu=-1"], "config key 'strategy.mu' must be >= 0, got -1"),
    (["strategy.name=gbme", "model.name=small_cnn_experts", "strategy.joint_fraction=-5"],
     "config key 'strategy.joint_fraction' must be >= 0, got -5"),
    (["seed=-1"], "config key 'seed' must be >= 0, got -1"),
    # a batch of one sample is dropped (BatchNorm): batch 1 would train nothing
    (["train.batch_size=1"], "config key 'train.batch_size' must be >= 2, got 1"),
    (["centralized.batch_size=1"], "config key 'centralized.batch_size' must be >= 2, got 1"),
    (["strategy.name=gbme"], "strategy gbme needs a multi-expert model, got model.name='small_cnn': set model.name "
                             "to one of resnet18_gn_experts, resnet32_experts, resnet8_experts, small_cnn_experts"),
    (["client.name=gbme"], "client method gbme needs a multi-expert model"),
    (["strategy.name=posthoc_calibration", "strategy.base=gbme"], "strategy gbme needs a multi-expert model"),
    ([f"federation.client_cpus={(os.cpu_count() or 1) + 1}"],
     f"config key 'federation.client_cpus' must be <= this machine's {os.cpu_count()} CPUs"),
    (["federation.discovery_timeout=0"], "config key 'federation.discovery_timeout' must be > 0"),
    # a client method that needs its strategy's messages, or sends replies only its strategy aggregates
    (["strategy.name=fedavg", "client.name=fedrod"], "client.name=fedrod trains under strategy fedrod (its messages "
     "and the replies only it aggregates), not 'fedavg': set strategy.name=fedrod"),
    (["strategy.name=fedprox", "client.name=fedloge"], "client.name=fedloge trains under strategy fedloge"),
    (["strategy.name=fedavg", "client.name=gbme", "model.name=small_cnn_experts"],
     "client.name=gbme trains under strategy gbme"),
    (["strategy.name=fedavg", "client.name=lfme"], "client.name=lfme trains under strategy lfme"),
    # a strategy that is FedAvg but for its own client, given another client (the run was FedAvg, named otherwise)
    (["strategy.name=fedlc", "client.name=area"], "strategy.name=fedlc is FedAvg on the server and client method "
     "fedlc on the clients (its keys reach only that client), so with client.name=area it would run "
     "strategy.name=fedavg under another name: set client.name=fedlc or strategy.name=fedavg"),
    (["strategy.name=fedprox", "client.name=fedavg"], "with client.name=fedavg it would run strategy.name=fedavg"),
    (["strategy.name=fedetf", "client.name=fedlc"], "strategy.name=fedetf is FedAvg on the server and client "
     "method fedetf"),
    (["client.name=area"], "sweep combination strategy.name=fedlc: strategy.name=fedlc is FedAvg on the server"),
    (["strategy.name=fedrod", "client.name=fedavg"], "strategy.name=fedrod is FedAvg on the server and client "
     "method fedrod"),
    (["strategy.name=posthoc_calibration", "strategy.base=fedlc", "client.name=fedavg"],
     "so with client.name=fedavg it would run strategy.base=fedavg under another name: set client.name=fedlc or "
     "strategy.base=fedavg"),
    (["strategy.name=dp_server_fixed", "strategy.base=ccvr", "strategy.base_options={base: fedprox}",
      "client.name=local_loss", "strategy.clipping_norm=1", "strategy.noise_multiplier=1"],
     "strategy.base_options.base=fedprox is FedAvg on the server and client method fedprox"),
    # a part that replaces or keeps the one classifier of a single network, given a multi-expert model
    (["strategy.name=fedbabu", "model.name=small_cnn_experts"], "strategy fedbabu keeps the one classifier at its "
     "initial weights, and model.name='small_cnn_experts' is a multi-expert model: choose a single network"),
    (["strategy.name=fedrod", "client.name=fedavg", "model.name=small_cnn_experts"], "strategy fedrod keeps a personal"),
    (["strategy.name=fedloge", "client.name=fedavg", "model.name=small_cnn_experts"], "strategy fedloge realigns"),
    (["strategy.name=fedetf", "model.name=small_cnn_experts"], "client method fedetf replaces the classifier"),
    (["strategy.name=fedavg", "client.name=fedbabu", "model.name=small_cnn_experts"], "client method fedbabu freezes"),
    (["mode=centralized", "centralized.method=tde", "model.name=small_cnn_experts"],
     "centralized.method=tde replaces one classifier by the causal-norm head, and model.name='small_cnn_experts'"),
    (["mode=centralized", "centralized.method=glmc", "model.name=small_cnn_experts"], "centralized.method=glmc adds"),
    (["mode=centralized", "centralized.method=sbcl", "model.name=small_cnn_experts"], "centralized.method=sbcl adds"),
    # a boolean for a number (pydantic alone reads true as 1)
    (["train.batch_size=true"], "config key 'train.batch_size' must be int, got True"),
    (["partition.alpha=yes"], "config key 'partition.alpha' must be float, got True"),
    (["data.imbalance_factor=true"], "config key 'data.imbalance_factor' must be float, got True"),
    (["seed=false"], "config key 'seed' must be int, got False"),
    # a run name that would leave --out
    (["name=../../etc"], "config key 'name' must be a plain name (the start of the run directory's name inside "
                         "--out), without / or \\ or control characters, not . or .., not starting with -, got "
                         "'../../etc'"),
    (["name=/tmp/elsewhere"], "config key 'name' must be a plain name"),
    # a layer width of 0 or less (resnet32 would fail to build in the first round)
    (["strategy.name=fedavg", "client.name=glmc", "model.name=resnet32", "client.resnet32_widths=[64, 0, 256]"],
     "config key 'client.resnet32_widths.1' must be > 0, got 0"),
    (["mode=centralized", "centralized.method=glmc", "centralized.resnet32_widths=[-1, 128, 256]"],
     "config key 'centralized.resnet32_widths.0' must be > 0, got -1"),
    # server momentum 1 never forgets a step (the run diverged and was blamed on the learning rate)
    (["strategy.name=fedavgm", "strategy.momentum=1"], "config key 'strategy.momentum' must be < 1, got 1"),
    # SGD momentum 1 never forgets a step (accepted: the run "finished" at chance, loss 97)
    (["train.momentum=1"], "config key 'train.momentum' must be < 1, got 1"),
    (["mode=centralized", "centralized.momentum=2"], "config key 'centralized.momentum' must be < 1, got 2"),
    (["strategy.name=ccvr", "strategy.momentum=1"], "config key 'strategy.momentum' must be < 1, got 1"),
    (["mode=centralized", "centralized.method=ncl", "model.name=small_cnn_experts", "centralized.key_momentum=1"],
     "config key 'centralized.key_momentum' must be < 1, got 1"),
    # Nesterov without momentum (fedlt's optimizer turned it off without a word; PyTorch refuses it)
    (["train.nesterov=true", "train.momentum=0"], "config key 'train.nesterov' asks for Nesterov momentum in the "
     "clients' training, whose momentum is 0 (train.momentum): Nesterov needs momentum > 0"),
    (["mode=centralized", "train.nesterov=true", "centralized.momentum=0"], "config key 'train.nesterov' asks for "
     "Nesterov momentum in the centralized training, whose momentum is 0 (centralized.momentum)"),
    # a decay factor above 1 grows the lr; a milestone twice decays twice
    (["federation.lr_schedule=step", "federation.lr_milestones=[2]", "federation.lr_gamma=5"],
     "config key 'federation.lr_gamma' must be <= 1, got 5"),
    (["mode=centralized", "centralized.gamma=5"], "config key 'centralized.gamma' must be <= 1, got 5"),
    (["federation.lr_schedule=step", "federation.lr_milestones=[1, 1]"], "config key 'federation.lr_milestones' "
     "names round 1 more than once (the lr would decay twice there): give each milestone once, got [1, 1]"),
    # more GBME experts than clients: empty groups (accepted, expert_groups [[], [2], [1], [], [3], [0]])
    (["strategy.name=gbme", "model.name=small_cnn_experts", "model.num_experts=6", "partition.num_clients=4"],
     "config key 'model.num_experts' (6) exceeds partition.num_clients=4: strategy gbme cuts the clients into one "
     "group per expert, so 2 groups would be empty"),
    # more hard categories than classes (silently all of them)
    (["mode=centralized", "centralized.method=ncl", "model.name=small_cnn_experts",
      "centralized.hard_categories=11"], "config key 'centralized.hard_categories' must be at most the number of "
     "classes (10), got 11"),
    # a crop padding as large as the image: random crops of padding only (accepted, trained on blanks)
    (["data.crop_padding=28"], "config key 'data.crop_padding' (28) is at least the side of the images (28 px)"),
    # a run directory name with a newline in it
    (['name="a\\nb"'], "config key 'name' must be a plain name (the start of the run directory's name inside --out), "
     "without / or \\ or control characters"),
    # one key, two meanings: SBCL's class-term weight γ was also a step schedule's lr decay
    (["mode=centralized", "centralized.method=sbcl", "centralized.schedule=step", "centralized.milestones=[2]"],
     "centralized.method=sbcl takes centralized.gamma as its class-term weight γ (0.25), which a step schedule "
     "would also take as its lr decay: use centralized.schedule=cosine, cosine_epoch or constant"),
    # an empty name fell back to the default method, or said "unknown strategy 'None'"
    (["mode=centralized", "centralized.method=null"], "config key 'centralized.method' needs a name, got an empty "
     "value"),
    (["strategy.name=null"], "config key 'strategy.name' needs a name, got an empty value"),
    # an empty value on the command line (an unset shell variable): data.root= read the default data set
    (["data.root="], "override 'data.root=' has no value (an unset shell variable?): give one, or data.root=null for "
     "none"),
    (["strategy.name="], "override 'strategy.name=' has no value"),
    (["data.root=' '"], "config key 'data.root' is empty (an unset shell variable?): give the data set's folder"),
    # YAML 1.1's other bases: seed=010 ran seed 8, rounds=1:30 ran 90 rounds, lr=0x10 trained at 16
    (["federation.rounds=1:30"], "config key 'federation.rounds' must be int, got '1:30'"),
    (["train.lr=0x10"], "config key 'train.lr' must be float, got '0x10'"),
    # one key twice on the command line: the last one won without a word
    (["train.lr=0.1", "train.lr=0.2"], "config key 'train.lr' is given twice on the command line ('train.lr=0.1' "
     "and 'train.lr=0.2'): give it once"),
    (["sweep.seed=[0,1]", "sweep.seed=[2,3]"], "config key 'sweep.seed' is given twice on the command line"),
    (["train={lr: 0.1}", "train.lr=0.2"], "config key 'train.lr' is given with 'train' on the command line"),
    # a section given no value dropped what the config sets in it (centralized.epochs 8 -> 10)
    (["centralized=null"], "override centralized=null gives the section 'centralized' no value, which would drop what "
     "the config sets in it (centralized.method, centralized.epochs, centralized.schedule): give its keys as "
     "centralized.KEY=VALUE, or centralized={} to clear it"),
    # a Cutout hole the size of the image blanked every training image; a milestone at epoch 0 decayed at once
    (["data.cutout=28"], "config key 'data.cutout' (28) is at least the side of the images (28 px): its hole could "
     "blank whole images"),
    (["mode=centralized", "centralized.autoaugment=true", "centralized.cutout=40"], "config key "
     "'centralized.cutout' (40) is at least the side of the images (28 px)"),
    (["mode=centralized", "centralized.schedule=step", "centralized.milestones=[0]"], "config key "
     "'centralized.milestones.0' must be > 0, got 0"),
    # a key with an empty part was pydantic's "Extra inputs are not permitted", naming no key
    (["train.=5"], "override 'train.=5': the key 'train.' has an empty part"),
    # a misspelt key or name: the closest one is suggested
    (["train.batchsize=32"], "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    (["trian.lr=0.1"], "unknown config key 'trian.lr' (did you mean 'train.lr'?)"),
    (["strategy.name=fedprox", "strategy.muu=1"], "unknown config key 'strategy.muu' (did you mean 'strategy.mu'?): "
     "not an option of strategy 'fedprox'"),
    (["strategy.name=fedprx"], "unknown strategy 'fedprx' (did you mean 'fedprox'?); known: "),
    # a step schedule without a milestone (it ran at a constant lr)
    (["mode=centralized", "centralized.schedule=step"], "config key 'centralized.milestones' must name at least one "
     "epoch with centralized.schedule=step (without one the lr never decays), got []"),
    (["mode=centralized", "centralized.method=crt", "centralized.stage2_schedule=step"],
     "config key 'centralized.stage2_milestones' must name at least one epoch with centralized.stage2_schedule=step"),
    (["federation.lr_schedule=step"], "config key 'federation.lr_milestones' must name at least one round with "
     "federation.lr_schedule=step"),
    (["mode=centralized", "centralized.method=sbcl", "centralized.stage2_warmup_epochs=2.5"],
     "config key 'centralized.stage2_warmup_epochs' must be a whole number of epochs"),
    # a stage 2 that needs a backbone and one classifier: refused only after stage 1 had trained
    (["mode=centralized", "centralized.method=crt", "model.name=small_cnn_experts"],
     "centralized.method=crt freezes the backbone and changes its one classifier in stage 2, and "
     "model.name='small_cnn_experts' is a multi-expert model: choose a single network"),
    (["mode=centralized", "centralized.method=cc_sam", "model.name=small_cnn_experts"],
     "centralized.method=cc_sam freezes the backbone"),
    (["mode=centralized", "centralized.method=tau_norm", "model.classifier=cosine"],
     "centralized.method=tau_norm needs a linear classifier (on a cosine classifier it changes nothing), got "
     "model.classifier=cosine: set model.classifier=linear"),
    # a stage 2 of no epochs: cRT's re-initialised classifier and LFME's student were reported untrained
    (["mode=centralized", "centralized.method=crt", "centralized.stage2_epochs=1"],
     "centralized.stage2_schedule=cosine_epoch_end (crt's own) runs the last epoch at lr 0 (the cosine stepped "
     "before each epoch) and centralized.stage2_epochs=1 has no other: give at least 2 epochs, or "
     "centralized.stage2_schedule=cosine"),
    (["mode=centralized", "centralized.schedule=cosine_epoch_end", "centralized.epochs=1"],
     "centralized.schedule=cosine_epoch_end runs the last epoch at lr 0"),
    (["mode=centralized", "centralized.method=crt", "centralized.stage2_epochs=0"],
     "centralized.method=crt re-initialises the classifier for stage 2: centralized.stage2_epochs=0 would report "
     "an untrained classifier; give at least 1"),
    (["mode=centralized", "centralized.method=lfme", "centralized.stage2_epochs=0"],
     "centralized.method=lfme distils its student in stage 2: centralized.stage2_epochs=0 would report the "
     "untrained student; give at least 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_config_value(capsys, tmp_path, overrides, message):
    assert message in refused(capsys, tmp_path, *overrides)


def test_a_device_this_machine_lacks_is_refused_before_any_data(capsys, tmp_path):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    line = refused(capsys, tmp_path, f"device=cuda:{count}")
    assert line == (f"error: device=cuda:{count}, but this machine has {count} CUDA device(s): cuda:0 to "
                    f"cuda:{count - 1}" if count else f"error: device=cuda:0, but this machine has no CUDA device "
                    f"(torch {torch.__version__}): use device=auto or device=cpu")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("source,raised", [
    ("raise RuntimeError('no licence file')\n", "RuntimeError while it was imported, at {file}:1: no licence file"),
    ("def f(:\n", "SyntaxError while it was imported, at {file}:1: invalid syntax"),
    ("import sys\nsys.exit(0)\n", "SystemExit while it was imported, at {file}:2: exit status 0, which would end "
     "fedlt"),
    ("from fedlt.federation.strategy import FedLTStrategy\nfrom fedlt.registry import STRATEGIES\n\n"
     "@STRATEGIES.register('fedavg')\nclass Mine(FedLTStrategy):\n    pass\n",
     "ValueError while it was imported, at {file}:4: strategy 'fedavg' is already registered: register yours under "
     "another name"),
], ids=["raises", "syntax error", "exits", "registers a taken name"])
def test_a_plugin_that_raises_on_import_is_one_line_naming_its_line(capsys, tmp_path, monkeypatch, source, raised):
    module = f"fedlt_bad_plugin_{abs(hash(source))}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = refused(capsys, tmp_path, f"plugins=[{module}]")
    file = tmp_path / f"{module}.py"
    assert line == (f"error: plug-in module {module!r} raised {raised.format(file=file)}; fix the module or drop it "
                    f"from plugins")


def test_a_report_folder_that_is_a_file_is_refused_before_training(capsys, tmp_path):
    report = tmp_path / "report"
    report.write_text("keep me")
    line = refused(capsys, tmp_path, "--report", str(report), *TINY_CENTRAL)
    assert line == f"error: report folder {report} is an existing file, not a folder"
    assert report.read_text() == "keep me" and not (tmp_path / "runs").exists()


def test_a_report_folder_where_nothing_can_be_written_is_refused_before_training(capsys, tmp_path):
    """/proc passes os.access for root: the runs trained, then writing the report ended in a traceback."""
    line = refused(capsys, tmp_path, "--report", "/proc/fedlt-report", "mode=centralized", "centralized.epochs=0.01",
                   *TINY)
    assert line.startswith("error: report folder /proc/fedlt-report cannot be written: /proc is not writable (")
    assert not (tmp_path / "runs").exists()


def test_a_check_across_sections_asks_only_the_parts_the_mode_runs():
    assert load_config(None, ["strategy.name=gbme", "mode=centralized"]).model.name == "small_cnn"
    assert load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts"]).client.name == "gbme"
    # a client method that needs its strategy runs under a wrapper of it (calibration around GBME)
    assert load_config(None, ["strategy.name=posthoc_calibration", "strategy.base=gbme", "client.name=gbme",
                              "model.name=small_cnn_experts"]).client.name == "gbme"


@pytest.mark.parametrize("overrides, client, source, method", [
    (["strategy.name=posthoc_calibration", "strategy.base=fedlc"], "fedlc",
     "derived from strategy fedlc, wrapped by posthoc_calibration", "posthoc_calibration+fedlc"),
    (["strategy.name=dp_server_fixed", "strategy.base=posthoc_calibration",
      "strategy.base_options={base: ccvr, base_options: {base: fedprox}}"], "fedprox",
     "derived from strategy fedprox, wrapped by dp_server_fixed", "dp_server_fixed+fedprox"),
    (["strategy.name=posthoc_calibration", "strategy.base=gbme", "model.name=small_cnn_experts"], "gbme",
     "derived from strategy gbme, wrapped by posthoc_calibration", "posthoc_calibration+gbme"),
    (["strategy.name=posthoc_calibration"], "fedavg", "derived from strategy fedavg, wrapped by posthoc_calibration",
     "posthoc_calibration"),
    (["strategy.name=ccvr", "strategy.base=fedavgm"], "fedavg", "derived from strategy fedavgm, wrapped by ccvr",
     "ccvr"),
    (["strategy.name=fedlc"], "fedlc", "derived from strategy fedlc", "fedlc"),
    (["strategy.name=posthoc_calibration", "strategy.base=fedlc", "client.name=fedlc"], "fedlc", "override",
     "posthoc_calibration+fedlc"),
])
def test_a_wrapper_brings_the_client_of_the_strategy_it_wraps(overrides, client, source, method):
    """``posthoc_calibration`` over ``fedlc`` trained FedAvg clients unless ``client.name=fedlc`` was given."""
    cfg = load_config(None, overrides, given := {})
    assert cfg.client.name == client
    assert key_sources(cfg, given)["client.name"] == source
    assert federated_method(cfg) == method  # the run's name says the client where it is not the wrapper's own


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=fedprox", "client.mu=1000"], "client.mu is not read under strategy.name=fedprox: its server "
     "sends its own strategy.mu (now 0.01) to every client; set strategy.mu=1000.0 instead"),
    (["strategy.name=fedlc", "client.tau=2"], "client.tau is not read under strategy.name=fedlc: its server sends "
     "its own strategy.tau (now 1.0) to every client; set strategy.tau=2.0 instead"),
    (["strategy.name=ccvr", "strategy.base=fedprox", "strategy.base_options.mu=0.5", "client.mu=5"],
     "client.mu is not read under strategy.base=fedprox: its server sends its own strategy.base_options.mu (now "
     "0.5) to every client; set strategy.base_options.mu=5.0 instead"),
    (["strategy.name=ccvr", "strategy.base=posthoc_calibration", "strategy.base_options.base=fedlc",
      "client.tau=3"], "client.tau is not read under strategy.base_options.base=fedlc: its server sends its own "
     "strategy.base_options.base_options.tau (now 1.0) to every client; set "
     "strategy.base_options.base_options.tau=3.0 instead"),
], ids=["fedprox", "fedlc", "under a wrapper", "two wrappers deep"])
def test_a_client_key_its_strategy_sends_in_its_place_is_refused(overrides, message):
    """FedProx's server sends μ and FedLC's τ to every client, which then never reads client.mu / client.tau:
    ``client.mu=1000`` ran as μ = 0.01 and config.yaml recorded 1000."""
    with pytest.raises(FedLTError) as err:
        load_config(None, ["mode=federated", *overrides])
    assert str(err.value) == message


def test_a_client_key_no_strategy_sends_is_read_and_an_unread_default_says_so():
    cfg = load_config(None, ["mode=federated", "strategy.name=fedavg", "client.name=fedprox", "client.mu=1000"])
    assert cfg.client.mu == 1000  # FedAvg sends no μ: the client's own is read
    cfg = load_config(None, ["mode=federated", "strategy.name=fedprox", "strategy.mu=3"], given := {})
    assert key_sources(cfg, given)["client.mu"] == "not read: strategy.name=fedprox sends strategy.mu"
    assert load_config(None, ["mode=centralized", "strategy.name=fedprox", "client.mu=1000"]).client.mu == 1000


def test_a_wrappers_unknown_key_points_at_its_base_options():
    with pytest.raises(FedLTError, match=r"^unknown config key 'strategy.mu': not an option of strategy 'ccvr'; ccvr "
                                         r"wraps strategy.base, whose keys are strategy.base_options.\*; strategy "
                                         r"fedprox takes it as strategy.mu"):
        load_config(None, ["strategy.name=ccvr", "strategy.base=fedprox", "strategy.mu=1000"])


@needs_fashion
@pytest.mark.parametrize("keys, line", [
    (["centralized.method=balpoe", "model.name=small_cnn_experts", "model.num_experts=5"],
     "error: model.num_experts=5 is not what centralized.method=balpoe builds: its model has num_experts=3; drop "
     "model.num_experts or set it to 3"),
    (["centralized.method=ldam_drw", "model.scale=30"], "error: model.scale=30.0 is not what "
     "centralized.method=ldam_drw builds: its model has scale=1.0; drop model.scale or set it to 1.0"),
], ids=["balpoe experts", "ldam head"])
def test_a_model_key_the_centralized_method_sets_otherwise_is_refused_before_any_run(capsys, tmp_path, keys, line):
    """BalPoE builds one expert per τ and LDAM-DRW a cosine head of scale 1: the run used those while config.yaml
    recorded 5 experts and scale 30. Refused before any run of the config trains (the federated one included)."""
    assert refused(capsys, tmp_path, "mode=both", "sweep={}", *keys) == line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_model_key_equal_to_the_methods_own_is_accepted():
    from fedlt.experiment import check_overridden_model_keys

    cfg = load_config(None, ["centralized.method=balpoe", "model.name=small_cnn_experts", "model.num_experts=3"])
    check_overridden_model_keys(cfg, {"num_experts": 3, "classifier": "cosine"})  # classifier not set: the method's
    with pytest.raises(FedLTError, match="model.num_experts=3 is not what"):
        check_overridden_model_keys(cfg, {"num_experts": 2})


@pytest.mark.parametrize("overrides, message", [
    (["data={flip: false}"], "override data={flip: false} would replace the whole section 'data' and drop what the "
     "config sets in it (data.name, data.imbalance_factor, data.crop_padding): give each key as data.KEY=VALUE, or "
     "repeat those keys in the mapping"),
    (["sweep.data=[{flip: false}]"], "sweep combination strategy.name=fedavg, data={'flip': False}: override "
     "data={flip: false} would replace the whole section 'data'"),
    (["sweep={}", "sweep.train.lr=[1e-3,0.001]"], "sweep combinations train.lr='1e-3' and train.lr=0.001 are the "
     "same config once validated: each value is one run; drop the repeat or give the value you meant"),
    (["sweep={}", "sweep.seed=[1,'1']"], "sweep combinations seed=1 and seed='1' are the same config once validated"),
], ids=["section mapping", "swept section mapping", "lr spelled twice", "seed spelled twice"])
def test_an_override_that_would_silently_change_other_keys_or_repeat_a_run_is_refused(overrides, message):
    """``data={flip: false}`` took every other data key's default (crop_padding 4, not the file's 2); a sweep of
    1e-3 and 0.001 (YAML 1.1 reads the first as a string) planned one run for "2 combinations"."""
    from fedlt.sweep import expand

    with pytest.raises(FedLTError) as err:
        expand(DEFAULT, overrides)
    assert str(err.value).startswith(message)


def test_a_whole_section_that_drops_nothing_is_accepted():
    from fedlt.sweep import expand

    assert load_config(DEFAULT, ["data={name: fashion_mnist, imbalance_factor: 10, crop_padding: 2, "
                                 "flip: false}"]).data.flip is False
    assert len(expand(DEFAULT, ["sweep={}"])) == 1  # {}: clear it
    assert load_config(None, ["data={flip: false}"]).data.crop_padding == 4  # no file: nothing dropped


def test_an_empty_out_or_an_overlong_run_name_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refused(capsys, tmp_path, "--dry-run", "--out", "", *TINY_CENTRAL) == \
        "error: --out is empty: give a folder for the run directories (default: runs)"
    line = refused(capsys, tmp_path, *TINY_CENTRAL, "sweep={}", "name=" + "a" * 300)
    assert line.startswith("error: the run directory name " + "a" * 60 + "… is 313 bytes, over the 255 a file "
                           "system allows: shorten name (300 bytes)")
    assert not list(tmp_path.iterdir())  # (no --out folder either: the plan is refused before it is made)


def test_a_base_options_name_other_than_the_base_is_refused():
    """``strategy.base=fedprox strategy.base_options.name=fedlc`` ran FedProx; the dry run showed fedlc."""
    with pytest.raises(FedLTError, match=r"^config key 'strategy.base_options' names strategy 'fedlc', but the "
                                         r"wrapped strategy is strategy.base=fedprox: set strategy.base=fedlc"):
        load_config(None, ["strategy.name=ccvr", "strategy.base=fedprox", "strategy.base_options.name=fedlc"])
    cfg = load_config(None, ["strategy.name=ccvr", "strategy.base=fedprox", "strategy.base_options.name=fedprox"])
    assert cfg.strategy.base_options.name == "fedprox"


@pytest.mark.parametrize("every", [1, 2, 3, 7, 10, 11])
def test_due_count_counts_the_due_steps(every):
    from fedlt.evaluation import due, due_count

    for total in range(1, 25):
        assert due_count(total, every) == sum(due(t, total, every) for t in range(1, total + 1))
    assert due_count(10**10, 4) == 2_500_000_000  # a dry run of 1e10 epochs: counted, not looped


@pytest.mark.parametrize("overrides, warning", [
    (["federation.lr_milestones=[5]"], "federation.lr_milestones [5] have no effect with "
     "federation.lr_schedule=constant"),
    (["federation.lr_schedule=step", "federation.lr_milestones=[8,16]", "federation.rounds=16"],
     "federation.lr_milestones [16] ≥ federation.rounds=16: the lr decays after round m, so never within the run"),
    (["eval.finetune_epochs=3"], "eval.finetune_epochs=3 has no effect with eval.local=off (it fine-tunes the model "
     "of the local evaluation)"),
    (["centralized.schedule=step", "centralized.milestones=[8]", "centralized.epochs=8"],
     "centralized.milestones [8.0] ≥ centralized.epochs=8: the lr decays after m epochs, so never within the run"),
    (["centralized.pretrain_epochs=5"], "centralized.pretrain_epochs=5 has no effect with centralized.pretrain=none"),
    # each section's own (Options.unused): accepted without a word before
    (["partition.method=iid", "partition.alpha=0.1"], "partition.alpha=0.1 has no effect: partition.method=iid reads "
     "none of alpha, min_size, balance, shards_per_client"),
    (["partition.method=shards", "partition.balance=true"], "partition.balance=True has no effect: "
     "partition.method=shards reads partition.shards_per_client only"),
    (["data.profile=none", "data.imbalance_factor=50"], "data.imbalance_factor=50.0 has no effect: data.profile=none "
     "uses the training set as it is"),
    (["federation.lr_gamma=0.5"], "federation.lr_gamma=0.5 has no effect: it decays a step schedule, and "
     "federation.lr_schedule=constant"),
    (["centralized.cutout=8", "centralized.augment_chunk=4"], "centralized.cutout=8, centralized.augment_chunk=4 have "
     "no effect: centralized.autoaugment=false"),
    (["centralized.warmup_factor=0.5"], "centralized.warmup_factor=0.5 has no effect: it shapes a warm-up, and "
     "centralized.warmup_epochs=0"),
    (["centralized.warmup_epochs=20"], "centralized.warmup_epochs=20 > centralized.epochs=10: the lr never reaches "
     "its full value within stage 1"),
    (["centralized.method=crt", "centralized.stage2_gamma=0.5"], "centralized.stage2_gamma=0.5 has no effect: it "
     "decays a stage-2 step schedule, and centralized.stage2_schedule=None (the method's own, not a step one)"),
    (["centralized.method=sbcl", "centralized.epochs=10"], "centralized.supcon_epochs=10 ≥ centralized.epochs=10: "
     "stage 1 ends before the first clustering (plain SupCon throughout)"),
    (["client.name=area", "client.area_from_round=30"], "client.area_from_round=30 > federation.rounds=20: AREA never "
     "re-weights (plain CE in every round)"),
    (["strategy.name=ccvr", "strategy.every=20"], "strategy.every=20 ≥ federation.rounds=20: CCVR calibrates after "
     "the last round only, as with strategy.every=0"),
    (["strategy.name=fedgrab", "strategy.prior=dpa", "strategy.prior_epsilon=5"], "strategy.prior_epsilon=5.0 has no "
     "effect: strategy.prior=dpa (the dp_counts priors read ε and δ)"),
], ids=["fed milestones, no step", "fed milestone at the end", "finetune, no local eval", "cen milestone at the end",
        "pretrain epochs, no pretrain", "alpha of iid", "balance of shards", "beta of profile none",
        "lr_gamma, no step", "cutout, no autoaugment", "warmup factor, no warm-up", "warm-up past the end",
        "stage-2 gamma, no step", "sbcl clusters never", "area never re-weights", "ccvr every past the end",
        "epsilon of dpa"])
def test_a_key_that_changes_nothing_is_said(overrides, warning):
    from fedlt.simulate import unused_keys

    assert unused_keys(load_config(None, ["mode=both", *overrides])) == [warning]
    assert unused_keys(load_config(None, ["mode=both"])) == []
    fixed = {"federation.rounds=16": "federation.rounds=17", "centralized.epochs=8": "centralized.epochs=9"}
    if any(o in fixed for o in overrides):  # one round / epoch more: the milestone decays the last one
        assert unused_keys(load_config(None, ["mode=both", *[fixed.get(o, o) for o in overrides]])) == []


def test_a_scale_for_linear_heads_is_said_in_a_federated_run():
    """model.scale is read by cosine heads only; the GBME runs of docs/results.md set the heads with
    model.classifier=linear and no scale. Centralized runs stay silent: LDAM's and the expert methods set cosine
    heads and their scale themselves (a model.scale against theirs is refused, a test above)."""
    from fedlt.simulate import unused_keys

    fed = ["mode=federated", "strategy.name=gbme", "model.name=small_cnn_experts"]
    assert unused_keys(load_config(None, [*fed, "model.classifier=linear", "model.scale=10"])) == [
        "model.scale=10.0 has no effect: it scales cosine heads, and model.classifier=linear"]
    assert unused_keys(load_config(None, [*fed, "model.classifier=linear"])) == []  # the default 30, not given
    assert unused_keys(load_config(None, [*fed, "model.scale=10"])) == []  # cosine heads read it
    assert unused_keys(load_config(None, ["mode=federated", "model.scale=10"])) == [  # small_cnn: linear default
        "model.scale=10.0 has no effect: it scales cosine heads, and model.classifier=linear"]
    assert unused_keys(load_config(None, ["mode=centralized", "model.scale=10"])) == []


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=ccvr", "model.name=small_cnn_experts"], "strategy ccvr re-fits the one classifier on virtual "
     "features, and model.name='small_cnn_experts' is a multi-expert model"),
    (["strategy.name=posthoc_calibration", "strategy.base=ccvr", "model.name=small_cnn_experts"],
     "strategy ccvr re-fits the one classifier"),
    (["strategy.name=creff", "model.name=small_cnn_experts"], "strategy creff re-trains the one nn.Linear "
     "classifier, and model.name='small_cnn_experts' is a multi-expert model"),
    (["strategy.name=creff", "model.classifier=cosine"], "strategy creff re-trains an nn.Linear classifier, and "
     "model.classifier=cosine: set model.classifier=linear"),
], ids=["ccvr experts", "ccvr wrapped", "creff experts", "creff cosine"])
def test_a_calibration_wrapper_without_its_one_classifier_is_refused_when_read(overrides, message):
    """CCVR found the multi-expert model after the last round (the whole run trained, then no summary); CReFF
    after round 1."""
    with pytest.raises(FedLTError, match="^" + re.escape(message)):
        load_config(None, ["mode=federated", *overrides])
    assert load_config(None, ["mode=federated", "strategy.name=creff"]).strategy.name == "creff"


@needs_fashion
def test_the_dry_run_counts_a_fraction_of_an_epoch_and_the_initial_evaluation(capsys, tmp_path):
    """0.2 epochs trains a fifth of an epoch's steps (it said all of them), and every run evaluates its initial
    model besides the due evaluations (it said one fewer)."""
    assert main(["--out", str(tmp_path), "--dry-run", *TINY, "mode=both", "centralized.epochs=0.2",
                 "federation.rounds=3", "eval.every=4"]) == 0
    out = capsys.readouterr().out
    per_epoch = int(re.search(r"centralized ce: 0.2 epochs × (\d+) steps", out).group(1))
    assert f"= {math.floor(0.2 * per_epoch + 0.5):,} steps, 2 evaluations" in out
    assert re.search(r"federated fedavg: 3 rounds × .* steps, 2 evaluations", out)


@pytest.mark.parametrize("overrides, message", [
    (["mode=centralized", "centralized.method=tde", "model.classifier=cosine"], "centralized.method=tde replaces the "
     "head by the causal-norm classifier, so model.classifier=cosine would not be used: drop it"),
    (["mode=federated", "client.name=tde", "model.scale=30"], "client method tde replaces the head by the "
     "causal-norm classifier, so model.scale=30.0 would not be used: drop it"),
    (["mode=federated", "strategy.name=fedetf", "model.classifier=cosine", "model.scale=16"], "client method fedetf "
     "replaces the head by its fixed ETF classifier, so model.classifier=cosine and model.scale=16.0 would not be "
     "used: drop them"),
], ids=["tde centralized", "tde client", "fedetf"])
def test_a_head_option_of_a_method_that_replaces_the_head_is_refused(overrides, message):
    """TDE's causal-norm head and FedETF's ETF classifier replace the model's head: a cosine head or its scale
    was recorded in config.yaml and not used."""
    with pytest.raises(FedLTError) as err:
        load_config(None, overrides)
    assert str(err.value) == message
    from fedlt.config import config_from_dict

    cfg = load_config(None, [overrides[0], overrides[1]])  # the defaults pass, also rebuilt from a dump
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg


def test_yaml_1_1_exponent_without_a_dot_is_a_float():
    assert load_config(None, ["partition.alpha=1e-6"]).partition.alpha == 1e-6


@needs_fashion
def test_too_many_shards_says_shards(capsys, tmp_path):
    line = refused(capsys, tmp_path, "partition.method=shards", "partition.shards_per_client=100000")
    assert "10 clients × 100000 shards" in line and "partition.shards_per_client" in line


def test_real_command_line_gbme_without_experts():
    p = subprocess.run([sys.executable, "-m", "fedlt.simulate", "strategy.name=gbme", "model.name=resnet32"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: strategy gbme needs a multi-expert model, got model.name='resnet32'")


# ------------------------------------------------------------------------------------------ --out
def test_out_is_a_file(capsys, tmp_path):
    (tmp_path / "runs").write_text("")
    assert "is a file" in refused(capsys, tmp_path, "train.lr=0.1")


def test_a_refused_config_leaves_no_out_folder(capsys, tmp_path):
    """Data that is not there is refused before any run starts, and --out (made for the run directories) is not
    left behind empty."""
    err = refused(capsys, tmp_path, "data.name=cifar10", f"data.root={tmp_path / 'nowhere'}", config=None)
    assert "data set not found" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["read-only", "proc"])
def test_out_is_not_writable(capsys, tmp_path, where):
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "runs"
    else:  # not even root can make a folder here
        target = "/proc/fedlt-runs"
    code = main(["--config", DEFAULT, "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--out {target} is not a folder this process can write" in err


# ------------------------------------------------------------------------------------------ data files
def write_list(root, name, lines):
    (root / name).write_text("".join(f"{line}\n" for line in lines))


@pytest.mark.parametrize("label", [15, 10, -1])
def test_file_list_label_out_of_range_names_file_and_line(capsys, tmp_path, label):
    write_list(tmp_path, "train.txt", ["a.png 0", f"b.png {label}", "c.png 3"])
    write_list(tmp_path, "test.txt", ["d.png 1"])
    line = refused(capsys, tmp_path, "data.name=cifar10_files", f"data.root={tmp_path}", "model.name=small_cnn")
    assert f"label {label} out of range in list file {tmp_path / 'train.txt'}:2" in line
    assert ("labels 0..9" in line) if label >= 0 else ("labels 0..9" in line or ">= 0" in line)


def test_file_list_of_an_open_data_set_refuses_a_negative_label(tmp_path):
    from fedlt.data.sources import load_file_list

    write_list(tmp_path, "train.txt", ["a.png 0", "b.png -3"])
    write_list(tmp_path, "test.txt", ["d.png 1"])
    with pytest.raises(FedLTError, match=r"label -3 out of range in list file .*train.txt:2: a label must be >= 0"):
        load_file_list(str(tmp_path), "train.txt", "test.txt")


def test_corrupt_image_names_the_file(capsys, tmp_path):
    from torchvision.io import write_png

    for i in range(5):
        write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / f"{i}.png"))
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    write_list(tmp_path, "train.txt", [f"{i}.png {i}" for i in range(4)])
    write_list(tmp_path, "test.txt", ["4.png 0"])  # held out: a test list may not repeat training images
    line = refused(capsys, tmp_path, "data.name=cifar10_files", f"data.root={tmp_path}", "data.profile=none",
                   "model.name=small_cnn", "partition.num_clients=2", "partition.min_size=1")
    assert f"cannot decode image {tmp_path / '2.png'}" in line


def write_idx(path, array, truncate=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = gzip.compress(header + array.astype(np.uint8).tobytes())
    path.write_bytes(data[: len(data) // 2] if truncate else data)


def write_fashion(root, bad_label=None, truncate=None):
    """A tiny Fashion-MNIST in IDX .gz files: 40 training and 10 test images of random pixels."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        labels = np.arange(n) % 10
        if bad_label is not None and prefix == "train":
            labels[7] = bad_label
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)),
                  truncate == f"{prefix}-images")
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, truncate == f"{prefix}-labels")


@pytest.mark.parametrize("which", ["train-images", "t10k-labels"])
def test_truncated_gz_idx_names_the_file(capsys, tmp_path, which):
    write_fashion(tmp_path, truncate=which)
    line = refused(capsys, tmp_path, f"data.root={tmp_path}")
    assert f"malformed IDX file {tmp_path / (which + '-idx' + ('3' if 'images' in which else '1') + '-ubyte.gz')}" \
        in line


def test_idx_label_out_of_range_names_the_file(capsys, tmp_path):
    write_fashion(tmp_path, bad_label=12)
    line = refused(capsys, tmp_path, f"data.root={tmp_path}")
    assert f"label 12 out of range in {tmp_path / 'train-labels-idx1-ubyte.gz'} (entry 7): labels must be in 0..9" \
        == line.removeprefix("error: ")


def test_cifar_batch_label_out_of_range(tmp_path):
    import pickle

    from fedlt.data.sources import load_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [1, 2, 3, 12 if name == "data_batch_3" else 4]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), dtype=np.uint8), "labels": labels}, f)
    with pytest.raises(FedLTError, match=r"label 12 out of range in .*data_batch_3 \(entry 3\)"):
        load_cifar(str(tmp_path), 10)


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_of_another_kind_of_run_is_one_line(tmp_path):
    """A centralized run's checkpoint.pt in a federated run's folder (the config.yaml is the federated one)."""
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    cfg = load_config(None, ["mode=federated", f"data.root={tmp_path}", *TINY, "federation.rounds=2",
                             "train.local_steps=1", "federation.engine=inprocess"])
    run = RunDir(tmp_path / "run")
    run_inprocess(cfg, str(run.path))
    for name in ("summary.json", "done"):
        (run.path / name).unlink()
    run.save_checkpoint({"step": 1, "elapsed": 1.0, "state": {"model": {}, "optimizer": {}}})
    with pytest.raises(FedLTError, match=r"^checkpoint .*checkpoint.pt does not fit this run \(KeyError: .*\): "
                                         r"delete it to start the run over$"):
        run_inprocess(cfg, str(run.path))


def test_a_checkpoint_of_a_run_of_another_config_is_refused_not_resumed(tmp_path):
    """The same kind of run and the same shapes, another learning rate: its checkpoint.pt copied into this run's
    folder would load; the config it records says it is not this run's."""
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    base = ["mode=federated", f"data.root={tmp_path}", *TINY, "federation.rounds=2", "train.local_steps=1",
            "federation.engine=inprocess"]
    this, other = (RunDir(tmp_path / name) for name in ("this", "other"))
    run_inprocess(load_config(None, base), str(this.path))
    run_inprocess(load_config(None, [*base, "train.lr=0.5"]), str(other.path))
    for name in ("summary.json", "done"):
        (this.path / name).unlink()
    kept = this.load_checkpoint()
    shutil.copy(other.path / "checkpoint.pt", this.path / "checkpoint.pt")
    with pytest.raises(FedLTError, match=r"^checkpoint .*this/checkpoint.pt was written by a run of another config "
                                         r"than the folder's config.yaml: delete it to start the run over$"):
        run_inprocess(load_config(None, base), str(this.path))
    this.save_checkpoint(kept)  # its own checkpoint back: the run finishes from it
    assert run_inprocess(load_config(None, base), str(this.path))["accuracy"] is not None


def test_a_run_started_by_an_earlier_fedlt_resumes_from_its_checkpoint(tmp_path, capsys):
    """config.yaml and checkpoint.pt written before a key was added to fedlt (here ``federation.hosts``, at its
    default): the run is the same config and resumes; it was restarted from scratch (its checkpoint's digest,
    of the old config.yaml, did not match today's config either)."""
    from fedlt.federation.inprocess import run_inprocess
    from fedlt.rundir import identity_digest

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    cfg = load_config(None, ["mode=federated", f"data.root={tmp_path}", *TINY, "federation.rounds=2",
                             "train.local_steps=1", "federation.engine=inprocess"])
    run = RunDir(tmp_path / "run")
    first = run_inprocess(cfg, str(run.path))
    for name in ("summary.json", "done"):
        (run.path / name).unlink()
    older = yaml.safe_load((run.path / "config.yaml").read_text())
    del older["federation"]["hosts"]
    (run.path / "config.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    run.save_checkpoint({**run.load_checkpoint(), "config": identity_digest(older)})
    capsys.readouterr()
    again = run_inprocess(cfg, str(run.path))
    assert "resuming after round 2" in capsys.readouterr().out
    assert again["accuracy"] == first["accuracy"] and "hosts" not in (run.path / "config.yaml").read_text()


class RunsCode:
    """Unpickling this object runs ``touch <marker>`` (what a replaced checkpoint.pt could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content", ["truncated", "garbage", "code", "not a checkpoint"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, content):
    run = RunDir(tmp_path / "run")
    f = run.path / "checkpoint.pt"
    marker = tmp_path / "ran"
    run.save_checkpoint({"step": 3, "elapsed": 1.5, "state": {"w": torch.ones(1000), "rng": {"s": 2**100}}})
    assert run.load_checkpoint()["state"]["rng"]["s"] == 2**100  # plain values come back through weights_only
    if content == "truncated":
        f.write_bytes(f.read_bytes()[:300])
    elif content == "garbage":
        f.write_bytes(b"\x00not a zip at all")
    elif content == "code":
        torch.save({"step": 3, "elapsed": 1.5, "state": RunsCode(marker)}, f)
    else:
        torch.save([1, 2, 3], f)
    with pytest.raises(FedLTError) as e:
        run.load_checkpoint()
    message = str(e.value)
    assert "\n" not in message and str(f) in message and "delete it to start the run over" in message
    if content == "code":
        assert "refused" in message and ("os.system" in message or "posix.system" in message)
    assert not marker.exists()  # the code never ran


def test_checkpoint_refuses_numpy_on_save(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['state'\]\['prior'\]\[0\] is a numpy.ndarray"):
        RunDir(tmp_path).save_checkpoint({"step": 1, "elapsed": 0.0, "state": {"prior": [np.zeros(2)]}})
    with pytest.raises(TypeError, match="numpy.float64"):
        RunDir(tmp_path).save_checkpoint({"step": 1, "elapsed": np.float64(0.0), "state": {}})


def test_truncated_checkpoint_on_rerun_says_which_file_and_how_to_start_over(capsys, tmp_path):
    write_fashion(tmp_path)
    args = ["--config", DEFAULT, "--out", str(tmp_path / "runs"), f"data.root={tmp_path}", *TINY_CENTRAL]
    assert main(args) == 0
    run = next(p.parent for p in tmp_path.rglob("checkpoint.pt"))
    for name in ("summary.json", "done"):  # interrupted after its last checkpoint
        (run / name).unlink()
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {ckpt} cannot be read" in err and "delete it to start" in err
    ckpt.unlink()  # as the message says: the run starts over
    assert main(args) == 0 and (run / "summary.json").is_file()


# ------------------------------------------------------------------------------------------ a diverging run
def test_centralized_nan_loss_stops_at_its_epoch_keeping_the_last_checkpoint(capsys, tmp_path):
    write_fashion(tmp_path)
    line = refused(capsys, tmp_path, "plugins=[plugins_for_tests.nonfinite]", "centralized.method=nan_ce",
                   f"data.root={tmp_path}", *TINY_CENTRAL)
    assert line.startswith("error: epoch 2 (stage 1): the training loss became non-finite (nan)")
    (ckpt,) = tmp_path.rglob("checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    rows = [json.loads(x) for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # the initial model, then the last good epoch


def test_nan_test_outputs_stop_the_run_at_their_epoch_keeping_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    """A model whose test logits hold NaN (a BatchNorm variance gone negative) used to be reported with the
    accuracy of an argmax over NaN."""
    from fedlt import evaluation

    real, calls = evaluation.predict_logits, []

    def nan_from_the_second_evaluation(*args, **kwargs):  # the initial model, then epoch 2 (eval.every)
        logits = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:
            logits[5, 3] = float("nan")
        return logits

    monkeypatch.setattr(evaluation, "predict_logits", nan_from_the_second_evaluation)
    write_fashion(tmp_path)
    line = refused(capsys, tmp_path, f"data.root={tmp_path}", *TINY_CENTRAL)
    assert line == ("error: epoch 2: the model's outputs are NaN or infinite on 1 of 10 test images, so its accuracy "
                    "would mean nothing (argmax of NaN): the model diverged; the last checkpoint stays")
    (ckpt,) = tmp_path.rglob("checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 1


@pytest.mark.parametrize("engine", ["inprocess", "fused", "hosts"])
def test_federated_nan_loss_names_partition_and_round_keeping_the_last_checkpoint(engine, tmp_path):
    """The same stop on every engine: the fused trainer (engine fused, and one host fusing both clients) must not
    aggregate the diverged client's NaN weights."""
    from fedlt.federation.fused import run_fused
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    cfg = load_config(None, ["plugins=[plugins_for_tests.nonfinite]", "client.name=nan_client", "mode=federated",
                             f"data.root={tmp_path}", *TINY, "federation.rounds=3", "federation.fraction=1",
                             "train.local_steps=2", *{"inprocess": [], "fused": ["federation.engine=fused"],
                                                      "hosts": ["federation.hosts=1"]}[engine]])
    with pytest.raises(FedLTError) as e:
        (run_fused if engine == "fused" else run_inprocess)(cfg, str(tmp_path / "run"))
    assert str(e.value) == ("partition 1, round 2: the training loss became non-finite (nan) within 2 steps: lower "
                            "the learning rate or check the data and the loss")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "run" / "summary.json").exists()


# ------------------------------------------------------------------------------------------ node discovery
def test_node_discovery_timeout_says_how_long_and_what_to_raise(message_identity):
    from fedlt.federation.server import discover_nodes

    class SlowGrid:  # nodes connected, but their actors answer after the time-out
        def get_node_ids(self):
            return [11, 12, 13]

        def send_and_receive(self, messages, *, timeout=None):
            assert timeout is not None and timeout <= 0.5 + 1e-9 or timeout == 1.0
            return []

    with pytest.raises(FedLTError, match=r"3 of 3 client nodes did not report their partition id within \d+ s "
                                         r"\(federation.discovery_timeout=0.5; raise it on a busy machine\)"):
        discover_nodes(SlowGrid(), 3, timeout=0.5)

    class ShortGrid(SlowGrid):  # fewer nodes than partitions ever connect
        def get_node_ids(self):
            return [11]

    with pytest.raises(FedLTError, match=r"only 1 of 3 client nodes connected within \d+ s "
                                         r"\(federation.discovery_timeout=0.2"):
        discover_nodes(ShortGrid(), 3, timeout=0.2)


# ------------------------------------------------------------------------------------------ resume, weights_only
def resumed_equals_uninterrupted(tmp_path, monkeypatch, run, cfg):
    """Run ``cfg`` to the end, keeping its step-1 checkpoint; put that checkpoint back as if the run had been
    killed after step 1, rerun: the resumed run (read with weights_only=True) gives the same summary."""
    path = tmp_path / "run"
    save = RunDir.save_checkpoint

    def keep_first(self, state):
        save(self, state)
        if state["step"] == 1:
            shutil.copyfile(self.path / "checkpoint.pt", self.path / "step1.pt")

    monkeypatch.setattr(RunDir, "save_checkpoint", keep_first)
    first = run(cfg, path)
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    for name in ("summary.json", "done", "checkpoint.pt"):
        (path / name).unlink()
    os.replace(path / "step1.pt", path / "checkpoint.pt")
    again = run(cfg, path)
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # the initial model, step 1 (kept), step 2 (run again)
    for key in ("accuracy", "balanced_accuracy", "per_class", "ece"):
        assert again[key] == first[key], key
    return first, again


@pytest.mark.parametrize("extra", [["strategy.name=gbme", "model.name=small_cnn_experts", "model.num_experts=2",
                                    "strategy.joint_fraction=0.5"],
                                   ["strategy.name=fedavgm", "strategy.momentum=0.9"]], ids=["gbme", "fedavgm"])
def test_federated_resume_through_weights_only_checkpoints(tmp_path, monkeypatch, extra):
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", *TINY, "mode=federated", "federation.rounds=2",
                             "federation.fraction=1", "train.local_steps=2", *extra])
    first, again = resumed_equals_uninterrupted(tmp_path, monkeypatch, lambda c, p: run_inprocess(c, str(p)), cfg)
    if cfg.strategy.name == "gbme":
        assert again["pi_hat"] == first["pi_hat"] and again["expert_groups"] == first["expert_groups"]


@pytest.mark.parametrize("method", ["mixup", "crt"])
def test_centralized_resume_through_weights_only_checkpoints(tmp_path, monkeypatch, method):
    from fedlt.centralized import run_centralized

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    stage2 = (["centralized.epochs=1", "centralized.stage2_epochs=1", "centralized.stage2_schedule=cosine"]
              if method == "crt" else ["centralized.epochs=2"])
    cfg = load_config(None, [f"data.root={tmp_path}", *TINY, "mode=centralized", f"centralized.method={method}",
                             *stage2])
    resumed_equals_uninterrupted(tmp_path, monkeypatch, lambda c, p: run_centralized(c, RunDir(p)), cfg)


# ------------------------------------------------------------------------------------------ less than a step
def test_epochs_below_one_batch_are_refused_before_training(capsys, tmp_path):
    """40 images at batch 32: 2 steps an epoch, so 0.2 epochs round to no step (the run would report the initial
    model as trained)."""
    write_fashion(tmp_path)
    line = refused(capsys, tmp_path, f"data.root={tmp_path}", *TINY, "mode=centralized", "centralized.epochs=0.2")
    assert line == ("error: config key 'centralized.epochs' (0.2) is less than one batch of the 40 training images "
                    "at batch 32: give at least 0.25")
    line = refused(capsys, tmp_path, f"data.root={tmp_path}", *TINY, "mode=federated", "train.local_epochs=0.01")
    assert line.startswith("error: config key 'train.local_epochs' (0.01) gives no client a local step (the "
                           "largest holds ")


def test_local_epochs_that_leave_some_clients_idle_say_how_many(capsys, tmp_path):
    from fedlt.experiment import experiment_for
    from fedlt.simulate import check_steps

    write_fashion(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", *TINY, "mode=federated", "partition.num_clients=4",
                             "train.batch_size=2"])
    exp = experiment_for(cfg)
    steps = sorted(len(p) // 2 for p in exp.parts)  # steps an epoch per client (a last batch of one dropped)
    assert steps[0] / steps[-1] < 0.8, steps  # uneven Dirichlet clients
    epochs = 0.6 / steps[-1]  # the largest client rounds 0.6 to one step; the smallest rounds to none
    idle = sum(round(epochs * n) == 0 for n in steps)
    check_steps(cfg.replace(train=cfg.train.model_copy(update={"local_epochs": epochs})), exp)
    assert capsys.readouterr().out == (f"warning: train.local_epochs={epochs:g} gives {idle} of 4 clients no local "
                                       f"step (their replies are the global model unchanged)\n")
    check_steps(cfg.replace(train=cfg.train.model_copy(update={"local_epochs": 1.0})), exp)
    assert capsys.readouterr().out == ""
    dp = load_config(None, [f"data.root={tmp_path}", *TINY, "mode=federated", "partition.num_clients=4",
                            "train.batch_size=2", "strategy.name=dp_server_fixed", "strategy.clipping_norm=1"])
    with pytest.raises(FedLTError) as e:  # Flower's clipping would divide by the idle clients' zero update norm
        check_steps(dp.replace(train=dp.train.model_copy(update={"local_epochs": epochs})), exp)
    assert str(e.value) == (f"config key 'train.local_epochs' ({epochs:g}) gives {idle} of 4 clients no local step, "
                            f"and dp_server_fixed's clipping divides by each update's norm (0 for them): raise it or "
                            f"set train.local_steps")


def test_deploy_certs_refuses_no_nodes_and_a_file_for_the_folder(capsys, tmp_path):
    from fedlt.deploy import main as deploy_main

    assert deploy_main(["certs", str(tmp_path / "certs"), "--nodes", "0"]) == 2
    assert capsys.readouterr().err == "error: --nodes 0: make at least one SuperNode key pair\n"
    (tmp_path / "file").write_text("x")
    assert deploy_main(["certs", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'} is a file, not a folder for the certificates\n"
    assert not (tmp_path / "certs").exists() and (tmp_path / "file").read_text() == "x"


def test_deploy_certs_refuses_a_folder_under_a_file(capsys, tmp_path):
    """A folder below a file ended in a NotADirectoryError traceback."""
    from fedlt.deploy import main as deploy_main

    (tmp_path / "file").write_text("x")
    assert deploy_main(["certs", str(tmp_path / "file" / "certs")]) == 2
    assert capsys.readouterr().err == (f"error: cannot make the certificate folder {tmp_path / 'file' / 'certs'}: "
                                       f"Not a directory\n")


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be 0 (a free one) to 65535, got 70000"),
    (["--port", "-1"], "--port must be 0 (a free one) to 65535, got -1"),
    (["--host", "nosuch.invalid"], "cannot listen on nosuch.invalid:0: "),
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
], ids=["port too large", "negative port", "unknown host", "no time", "nan time"])
def test_deploy_run_refuses_bad_arguments_before_starting_anything(capsys, tmp_path, monkeypatch, args, message):
    """A port out of range (OverflowError) and an unresolvable --host without --port (socket.gaierror) ended in a
    traceback; --timeout 0 started the SuperLink and every node, then stopped the run at once, and NaN never
    stopped it."""
    from fedlt import deploy
    from fedlt.deploy_certs import make_certs

    certs = make_certs(tmp_path / "certs", nodes=2)
    monkeypatch.setattr(deploy.Deployment, "start_superlink", lambda self: pytest.fail("started a SuperLink"))
    assert deploy.main(["run", "--certs", str(certs), "--out", str(tmp_path / "out"), *args,
                        "partition.num_clients=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err


def test_a_negative_milestone_is_refused():
    with pytest.raises(FedLTError, match=r"config key 'centralized.milestones.0' must be > 0, got -1"):
        load_config(None, ["centralized.milestones=[-1]"])
    with pytest.raises(FedLTError, match=r"config key 'federation.lr_milestones.1' must be >= 1, got -5"):
        load_config(None, ["federation.lr_milestones=[3, -5]"])


def test_a_fractional_warmup_is_refused():
    """The warm-up steps once per epoch (lr·(e+1)/W): 0.5 epochs used to give no warm-up, 2.5 a warm-up of 2."""
    with pytest.raises(FedLTError, match=r"config key 'centralized.warmup_epochs' must be a whole number of epochs "
                                         r".*, got 0.5$"):
        load_config(None, ["centralized.warmup_epochs=0.5"])
    assert load_config(None, ["centralized.warmup_epochs=5"]).centralized.warmup_epochs == 5


# ------------------------------------------------------------------------------------------ --dry-run
@needs_fashion
@pytest.mark.parametrize("args, message", [
    (["mode=centralized", "centralized.epochs=0.0001"], "config key 'centralized.epochs' (0.0001) is less than one "
                                                        "batch of the 60000 training images at batch 32"),
    (["mode=federated", "train.local_epochs=0.0001"], "config key 'train.local_epochs' (0.0001) gives no client a "
                                                      "local step"),
    (["device=cuda:99"], "device=cuda:99, but this machine has"),
    (["federation.client_gpus=99"], "config key 'federation.client_gpus' must be <= this machine's"),
    (["--report", "{file}"], "report folder {file} is an existing file, not a folder"),
    (["--out", "{file}"], "--out {file} is a file, not a folder for run directories"),
], ids=["epochs below a batch", "no local step", "device", "client gpus", "report is a file", "out is a file"])
def test_dry_run_refuses_what_the_run_would_refuse(capsys, tmp_path, args, message):
    """--dry-run printed a plan and an estimate (or, for a device this machine lacks, a torch traceback) for
    configs and arguments that the real command refuses before training."""
    file = tmp_path / "afile"
    file.write_text("keep")
    args = [a.format(file=file) for a in args]
    assert refused(capsys, tmp_path, "--dry-run", *TINY, *args).startswith("error: " + message.format(file=file))
    assert file.read_text() == "keep"


@needs_fashion
def test_dry_run_refuses_a_run_directory_of_another_config(capsys, tmp_path):
    from fedlt.sweep import expand, plan

    args = [*TINY, "mode=centralized", "centralized.epochs=1"]
    run = plan(expand(DEFAULT, args), tmp_path / "runs")[0]
    RunDir(run.path).write_config(load_config(DEFAULT, [*args, "centralized.lr=0.5"]).replace(sweep={}))
    line = refused(capsys, tmp_path, "--dry-run", *args)
    assert line.startswith(f"error: run directory {run.path} holds an unfinished run of another config "
                           f"(centralized.lr: 0.5 there"), line


# ------------------------------------------------------------------------------------------ sweeps
@pytest.mark.parametrize("args, message", [
    (["train.lr=0.1", "sweep.train.lr=[0.1,0.2]"],
     "config key 'train.lr' is given both as an override and by sweep.train.lr=[..], whose values would replace "
     "it: give one of them"),
    (["sweep.strategy.name=[fedavg]", "strategy.name=fedprox"], "config key 'strategy.name' is given both as an "
                                                                "override and by sweep.strategy.name=[..]"),
    (["strategy.name=fedprox", "strategy.mu=0.1", "sweep.strategy=[{name: fedprox}]"],
     "config key 'strategy.mu' is given both as an override and by sweep.strategy=[..]"),
], ids=["same key", "sweep first", "a section swept"])
def test_a_key_both_given_and_swept_on_the_command_line_is_refused(capsys, tmp_path, monkeypatch, args, message):
    """The sweep's values replaced the override without a word (train.lr=0.1 sweep.train.lr=[0.1,0.2] ran 0.2 too;
    strategy.name=fedprox sweep.strategy.name=[fedavg] ran FedAvg only)."""
    from fedlt import simulate
    from fedlt.sweep import expand

    with pytest.raises(FedLTError) as e:
        expand(DEFAULT, [*TINY, *args])
    assert str(e.value).startswith(message)
    monkeypatch.setattr(simulate, "run_sweep", lambda *a, **k: pytest.fail("ran a sweep it should refuse"))
    assert refused(capsys, tmp_path, *TINY, *args).startswith("error: " + message)


@pytest.mark.parametrize("item, message", [
    ("sweep.seed=[0,1,0]", "sweep key 'seed' lists 0 twice ([0, 1, 0]): each value is one run; drop the repeat or "
                           "give the value you meant"),
    ("sweep.train.lr=[0.1,0.10]", "sweep key 'train.lr' lists 0.1 twice ([0.1, 0.1])"),
    ("sweep.federation.lr_milestones=[[5],[5]]", "sweep key 'federation.lr_milestones' lists [5] twice"),
], ids=["seed", "float written twice", "a list value"])
def test_a_sweep_value_listed_twice_is_refused(capsys, tmp_path, monkeypatch, item, message):
    """sweep.seed=[0,0] (a typo for [0,1]) ran one seed where two were asked for: the repeat's runs were the same
    runs, skipped without a word (--dry-run said "sweep of 4 combinations" and listed 3 runs)."""
    from fedlt import simulate
    from fedlt.sweep import expand

    with pytest.raises(FedLTError) as e:
        expand(DEFAULT, [*TINY, item])
    assert str(e.value).startswith(message)
    monkeypatch.setattr(simulate, "run_sweep", lambda *a, **k: pytest.fail("ran a sweep it should refuse"))
    assert refused(capsys, tmp_path, *TINY, item).startswith("error: " + message)


# ------------------------------------------------------------------------------------------ the command line (audit)
def test_decimal_numbers_are_read_as_written():
    """YAML 1.1 read seed=010 as 8 (octal) into a run named seed8; a name of digits was refused as a number."""
    assert load_config(None, ["seed=010"]).seed == 10
    assert load_config(None, ["name=007"]).name == "007"
    assert load_config(None, ["train.lr=1e-3", "train.batch_size=+32"]).train.lr == 1e-3


@pytest.mark.parametrize("option", ["--config", "--out", "--report", "--jobs"])
def test_an_option_given_twice_is_refused(capsys, option):
    values = {"--config": ("configs/default.yaml",) * 2, "--jobs": ("1", "2")}.get(option, ("a", "b"))
    with pytest.raises(SystemExit) as exit_:
        main([option, values[0], option, values[1], "--dry-run"])
    assert exit_.value.code == 2
    assert f"{option} given twice ({values[0]} and {values[1]}): give it once" in capsys.readouterr().err


@needs_fashion
def test_a_file_where_a_run_directory_goes_is_refused_before_any_run(capsys, tmp_path):
    """mkdir raised FileExistsError (a traceback) after the data had been loaded; a dry run said nothing."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a-seed0-cen-ce").write_text("x")
    for dry in ([], ["--dry-run"]):
        line = refused(capsys, tmp_path, *dry, "name=a", "mode=centralized", "centralized.epochs=0.02")
        assert line == (f"error: run directory {tmp_path / 'runs' / 'a-seed0-cen-ce'} is a file (or a broken link), "
                        f"not a folder: move it, or give another --out or name=")
    assert (tmp_path / "runs" / "a-seed0-cen-ce").read_text() == "x"


def test_a_childs_value_fixes_what_its_base_sweeps(tmp_path):
    """A child of configs/default.yaml that sets strategy.name: fedprox ran the base's sweep (FedAvg and FedLC)
    and never FedProx; an empty section in a child dropped its base's keys of that section."""
    from fedlt.sweep import expand

    (tmp_path / "child.yaml").write_text(f"base: {ROOT / 'configs' / 'default.yaml'}\nstrategy: {{name: fedprox}}\n"
                                         f"train:\n  # lr: 0.2\n")
    combos = expand(tmp_path / "child.yaml")
    assert [c.strategy.name for c, _ in combos] == ["fedprox"]
    assert combos[0][0].train.lr == 0.05 and combos[0][0].train.batch_size == 64  # the base's, not the defaults
    # the same key swept by the child too: the child's sweep
    (tmp_path / "sweeps.yaml").write_text(f"base: {ROOT / 'configs' / 'default.yaml'}\nstrategy: {{name: fedprox}}\n"
                                          f"sweep: {{strategy.name: [fedprox, fedavgm]}}\n")
    assert [c.strategy.name for c, _ in expand(tmp_path / "sweeps.yaml")] == ["fedprox", "fedavgm"]
    # within one file a plain value beside its sweep is the sweep's default: default.yaml runs both methods
    assert [c.strategy.name for c, _ in expand(ROOT / "configs" / "default.yaml")] == ["fedavg", "fedlc"]


def test_a_yaml_syntax_error_says_where(tmp_path):
    (tmp_path / "tab.yaml").write_text("seed: 0\ntrain:\n\tlr: 0.1\n")
    with pytest.raises(FedLTError) as err:
        load_config(tmp_path / "tab.yaml")
    assert str(err.value) == (f"config file {tmp_path / 'tab.yaml'} is not valid YAML: line 3, column 1: found "
                              f"character '\\t' that cannot start any token")


def test_a_config_folder_is_named_as_a_folder(capsys, tmp_path):
    """``--config configs`` said "config file not found" of a folder that exists."""
    assert refused(capsys, tmp_path, config=str(ROOT / "configs")) == \
        f"error: config file {ROOT / 'configs'} is a folder: give one of its .yaml files"


@needs_fashion
def test_out_or_a_report_inside_a_run_directory_is_refused(capsys, tmp_path):
    """--out inside a finished run trained a nested run there; --report inside one wrote among its files."""
    run = tmp_path / "runs" / "a-seed0-cen-ce"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "partition.json").write_text("{}")  # written as a run starts: a run directory to fedlt.compare too
    before = sorted(p.name for p in run.iterdir())
    assert refused(capsys, tmp_path, "--out", str(run / "more"), *TINY_CENTRAL) == (
        f"error: --out {run / 'more'} is inside the run directory {run}: give a folder outside it (run "
        f"directories go side by side, e.g. its parent {run.parent})")
    assert refused(capsys, tmp_path, "--report", str(run / "report"), *TINY_CENTRAL) == (
        f"error: report folder {run / 'report'} is inside the run directory {run}: give a folder outside it, so "
        f"that the report's files do not mix with the run's")
    assert sorted(p.name for p in run.iterdir()) == before
