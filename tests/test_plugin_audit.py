"""What a researcher following README.md and docs/plugins.md met with plug-ins of their own: ``--keys`` / ``--list``
with the plug-ins a config names, a broken or shadowed plug-in package, a plug-in's Options of the wrong base, its
validators' and ``check_config``'s errors, the docs' own example command, and ``--dry-run``'s labels of a wrapper's
base keys. Each error is one line (exit status 2 on the command line)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from fedlt import registry
from fedlt.config import key_sources, load_config, set_given
from fedlt.errors import FedLTError
from fedlt.options import DataOptions, HeadOptions
from fedlt.registry import STRATEGIES
from fedlt.simulate import main

EXAMPLE = ROOT / "docs" / "examples"


def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> str:
    """A plug-in module ``name``, importable from ``tmp_path``: the usual imports (4 lines), then ``source``."""
    header = ("from pydantic import BaseModel, Field, model_validator\n"
              "from fedlt.federation.strategy import FedLTStrategy\nfrom fedlt.options import Options\n"
              "from fedlt.registry import STRATEGIES\n")
    (tmp_path / f"{name}.py").write_text(header + textwrap.dedent(source).lstrip("\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


class FakeEntryPoint:
    """An entry point of the ``fedlt.plugins`` group naming module ``value``."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.group = name, value, registry.ENTRY_POINT_GROUP

    def load(self):
        return __import__(self.value)


@pytest.mark.parametrize("how", ["config", "override"])
def test_keys_and_list_import_the_plugins_a_config_or_override_names(capsys, monkeypatch, tmp_path, how):
    """``--keys my_strategy`` prints a plug-in's keys (docs/plugins.md): for a module named in ``plugins:`` (not an
    entry point) it said "no section or registered part of that name", and ``--list`` left the plug-in out. The
    config's other keys are not read (here a wrong one)."""
    mod = plugin_module(tmp_path, monkeypatch, f"fedlt_cli_plugin_{how}", f"""
        @STRATEGIES.register("cli_class_avg_{how}")
        class ClassAvg(FedLTStrategy):
            class Options(FedLTStrategy.Options):
                knob: float = Field(2.5, ge=0, description="a knob of the plug-in")
        """)
    config = tmp_path / "my_plugins.yaml"
    config.write_text(f"plugins: [{mod}]\nstrategy: {{name: cli_class_avg_{how}}}\nfederation: {{rounds: many}}\n")
    args = ["--config", str(config)] if how == "config" else [f"plugins=[{mod}]"]
    assert main(["--keys", f"cli_class_avg_{how}", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^strategy\.knob +float +2\.5 +\[strategy cli_class_avg_{how}\] a knob of the plug-in$", out,
                     re.MULTILINE), out
    assert main(["--list", *args]) == 0
    listed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("strategies: "))
    assert {f"cli_class_avg_{how}", "fedavg"} <= set(listed.split(": ")[1].split(", "))
    assert main(["--list", "plugins=[fedlt_no_such_module]"]) == 2
    assert capsys.readouterr().err == ("error: cannot import plug-in module 'fedlt_no_such_module': No module named "
                                       "'fedlt_no_such_module'\n")


def test_a_broken_entry_point_plugin_is_one_line_for_every_command(capsys, monkeypatch, tmp_path):
    """A plug-in package whose module raises turned every command into a traceback, ``--help`` included (its
    epilog lists the keys of every part, which loads the plug-ins). Now: the one-line error, exit status 2, every
    time (the half-filled registries are never used); ``--help`` prints the help, without the keys, saying why."""
    (tmp_path / "fedlt_broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda group=None, **kw: [
        *real(group=group), FakeEntryPoint("broken", "fedlt_broken_plugin")])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    line = (f"plug-in module 'fedlt_broken_plugin' (entry point 'broken' of 'fedlt.plugins') raised RuntimeError "
            f"while it was imported, at {tmp_path / 'fedlt_broken_plugin.py'}:1: boom; fix the module or uninstall its "
            f"package")
    for args in (["--list"], ["--keys", "fedprox"], ["--dry-run", "--out", str(tmp_path / "runs")], ["seed=1"]):
        assert main(args) == 2, args
        assert capsys.readouterr().err == f"error: {line}\n"
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fedlt.simulate") and "--dry-run" in out
    assert f"keys: not listed, because the plug-ins failed to load (any other command says so too):\n  {line}" in out


@pytest.mark.parametrize("package, kind", [("strategies", "strategy"), ("clients", "client method")])
def test_a_folder_named_like_a_built_in_plugin_package_is_one_line(tmp_path, package, kind):
    """README: "a strategy is one file in strategies/". That folder in the working directory was imported in place
    of fedlt's own package (sys.path[0]): ``unknown strategy 'fedavg'; known: my_method``, and --list showed no
    built-in strategy (a ``clients/`` broke fedlt's strategies, which import its clients). Now a one-line error
    naming it, from any command, before any plug-in runs."""
    folder = tmp_path / package
    folder.mkdir()
    (folder / "__init__.py").write_text("from . import my_method  # noqa: F401\n")
    (folder / "my_method.py").write_text("from fedlt.registry import STRATEGIES\n"
                                         "STRATEGIES.register('my_method', type('MyMethod', (), {}))\n")
    proc = subprocess.run([sys.executable, "-m", "fedlt.simulate", "--list"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == (f"error: {folder.resolve()} shadows fedlt's built-in plug-in package {package!r} "
                           f"({ROOT.resolve() / package}): Python imports it in its place (it comes first on the "
                           f"import path: the working directory or PYTHONPATH), which hides every built-in {kind}; "
                           f"rename that folder (e.g. my_{package}, then plugins=[my_{package}.<module>]) or run from "
                           f"another directory\n")


def _build_tiny() -> None:
    """A model builder registered with the wrong ``options=`` below."""


@pytest.mark.parametrize("parent, shown", [("BaseModel", "pydantic.main.BaseModel"),
                                           ("Options", "fedlt.options.Options")])
def test_a_plugins_options_must_subclass_its_registrys_base(monkeypatch, tmp_path, parent, shown):
    """A plug-in's ``Options`` of a plain pydantic BaseModel gave a traceback once the config was checked; of
    fedlt.options.Options (no ``name``) a 600-character "unknown config key 'strategy.name'" blaming the config.
    Now the plug-in's import fails in one line naming it, its class and the base class to subclass."""
    name = f"opts_{parent.lower()}"
    mod = plugin_module(tmp_path, monkeypatch, f"fedlt_{name}", f"""
        @STRATEGIES.register("{name}")
        class Wrong(FedLTStrategy):
            class Options({parent}):
                knob: float = Field(1.0, description="a knob")
        """)
    with pytest.raises(FedLTError) as err:
        load_config(None, [f"plugins=[{mod}]", f"strategy.name={name}"])
    assert str(err.value) == (
        f"plug-in module {mod!r} raised TypeError while it was imported, at {tmp_path / (mod + '.py')}:5: strategy "
        f"{name!r} (Wrong): its Options Wrong.Options subclasses {shown}; it must subclass "
        f"fedlt.options.StrategyOptions (its parent's, e.g. class Options(FedLTStrategy.Options)); fix the module or "
        f"drop it from plugins")
    assert name not in STRATEGIES
    models = registry.Registry("model", base_options=HeadOptions)  # a function's options=: the same check
    with pytest.raises(TypeError, match=re.escape("model 'tiny' (_build_tiny): its Options DataOptions subclasses "
                                                  "fedlt.options.Options; it must subclass fedlt.options.HeadOptions")
                       + "$"):
        models.register("tiny", _build_tiny, options=DataOptions)
    assert "tiny" not in models.meta


def test_a_plugins_options_keep_the_type_of_a_core_key():
    """A centralized method declaring ``epochs: int`` refused ``centralized.epochs=1.5`` as "must be int" for that
    method only; a key of the section's base options keeps its type (its default may differ)."""
    from pydantic import Field

    from fedlt.centralized.base import CentralizedMethod
    from fedlt.options import CentralizedOptions

    methods = registry.Registry("centralized method", base_options=CentralizedOptions)

    class IntEpochs(CentralizedMethod):
        class Options(CentralizedOptions):
            epochs: int = Field(3, gt=0, description="epochs")

    with pytest.raises(TypeError, match=r"^centralized method 'int_epochs': its Options declare the core key "
                                        r"'epochs' as int, where every centralized method takes float: keep its type"):
        methods.register("int_epochs", IntEpochs)

    class OwnDefault(CentralizedMethod):
        class Options(CentralizedOptions):
            epochs: float = Field(3.0, gt=0, description="epochs")

    assert methods.register("own_default", OwnDefault) is OwnDefault and "int_epochs" not in methods.meta


def test_a_plugins_check_across_keys_is_one_line_naming_its_section(monkeypatch, tmp_path):
    """docs/plugins.md: a ValueError raised in a validator becomes the one line. A model_validator's (no field of
    its own) gave "config key 'strategy.' strategy.low must be below strategy.high, got a mapping"."""
    mod = plugin_module(tmp_path, monkeypatch, "fedlt_lowhigh", """
        @STRATEGIES.register("fedlt_test_lowhigh")
        class LowHigh(FedLTStrategy):
            class Options(FedLTStrategy.Options):
                low: float = Field(0.0, description="low end")
                high: float = Field(1.0, description="high end")

                @model_validator(mode="after")
                def _ordered(self):
                    if self.low >= self.high:
                        raise ValueError("strategy.low must be below strategy.high")
                    return self
        """)

    def refused(*overrides: str) -> str:
        with pytest.raises(FedLTError) as err:
            load_config(None, [f"plugins=[{mod}]", *overrides])
        return str(err.value)

    assert refused("strategy.name=fedlt_test_lowhigh", "strategy.low=2") == (
        "config section 'strategy': strategy.low must be below strategy.high")
    assert refused("strategy.name=posthoc_calibration", "strategy.base=fedlt_test_lowhigh",
                   "strategy.base_options={low: 3}") == (
        "config section 'strategy.base_options': strategy.low must be below strategy.high")
    assert load_config(None, [f"plugins=[{mod}]", "strategy.name=fedlt_test_lowhigh", "strategy.low=0.5"]).strategy.low
    # a field validator's message still follows its key
    assert refused("federation.lr_schedule=step") == (
        "config key 'federation.lr_milestones' must name at least one round with federation.lr_schedule=step (without "
        "one the lr never decays), got []")


@pytest.mark.parametrize("exc", ["ValueError", "TypeError"])
def test_a_plugins_check_config_raising_value_error_is_one_line(capsys, monkeypatch, tmp_path, exc):
    """A ``check_config`` that raises ValueError (or TypeError) instead of FedLTError was a traceback, exit 1."""
    name = f"picky_{exc.lower()}"
    mod = plugin_module(tmp_path, monkeypatch, f"fedlt_{name}", f"""
        @STRATEGIES.register("{name}")
        class Picky(FedLTStrategy):
            @classmethod
            def check_config(cls, cfg):
                if cfg.partition.num_clients < 50:
                    raise {exc}("needs at least 50 clients")
        """)
    with pytest.raises(FedLTError) as err:
        load_config(None, [f"plugins=[{mod}]", f"strategy.name={name}"])
    assert str(err.value) == f"strategy {name}: needs at least 50 clients"
    assert load_config(None, [f"plugins=[{mod}]", f"strategy.name={name}", "partition.num_clients=50"])
    config = tmp_path / "picky.yaml"
    config.write_text(f"plugins: [{mod}]\nmode: federated\nstrategy: {{name: {name}}}\n")
    assert main(["--dry-run", "--config", str(config), "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == f"error: strategy {name}: needs at least 50 clients\n"


def test_an_unknown_part_hints_at_plugins():
    """A plug-in of one's own that the config does not name in ``plugins:`` is "unknown": say how to name it."""
    with pytest.raises(FedLTError) as err:
        load_config(None, ["strategy.name=my_own_strategy"])
    assert str(err.value).startswith("unknown strategy 'my_own_strategy'; known: ccvr, ")
    assert str(err.value).endswith("(a plug-in of your own: name its module in plugins=[module])")


def test_docs_run_command_runs_the_example(tmp_path):
    """docs/plugins.md's "Run it" command gave "unknown strategy 'global_prior_bs'" (the example is no installed
    module and the command did not name it in plugins=), and its line count was off by one. Its config is resolved
    here as the command would, in a process of its own, with the command's PYTHONPATH ($PWD: the repository)."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    claimed = re.search(r"\(examples/global_prior_bs\.py\) \((\d+) lines\)", text)
    assert claimed and int(claimed.group(1)) == len((EXAMPLE / "global_prior_bs.py").read_text().splitlines())
    block = re.search(r"Run it.*?```\n(.*?)```", text, re.DOTALL)
    assert block, "no command block after 'Run it'"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    start = words.index("python")
    assert words[start:start + 3] == ["python", "-m", "fedlt.simulate"]
    env = dict(w.replace("$PWD", str(ROOT)).split("=", 1) for w in words[:start])
    overrides = [w for w in words[start + 3:] if "=" in w and not w.startswith("-")]
    code = ("import sys; from fedlt.config import load_config; c = load_config(None, sys.argv[1:]); "
            "print(c.strategy.name, c.client.name, c.strategy.tau)")
    proc = subprocess.run([sys.executable, "-c", code, *overrides], env={**os.environ, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["global_prior_bs", "global_prior_bs", "1.0"]


def test_a_wrappers_untouched_base_keys_are_its_bases_defaults(tmp_path):
    """``--dry-run strategy.name=dp_server_fixed strategy.base=ccvr "strategy.base_options={base: fedavg}"`` showed
    every key of CCVR's as ``(override)`` although only ``base`` was given."""
    given: dict[str, str] = {}
    cfg = load_config(None, ["strategy.name=dp_server_fixed", "strategy.base=ccvr",
                             "strategy.base_options={base: fedavg}"], given)
    sources = key_sources(cfg, given)
    assert sources["strategy.base"] == sources["strategy.base_options.base"] == "override"
    assert sources["strategy.base_options.name"] == "derived from strategy.base"
    assert sources["strategy.base_options.base_options.name"] == "derived from strategy.base_options.base"
    assert sources["strategy.base_options.every"] == sources["strategy.base_options.lr"] == "default of strategy ccvr"
    assert sources["strategy.noise_multiplier"] == "default of strategy dp_server_fixed"
    # from a file: what base_options gives is the file's, the rest the wrapped strategy's defaults
    path = tmp_path / "dp.yaml"
    path.write_text("strategy:\n  name: dp_server_fixed\n  base: ccvr\n  base_options: {base: fedavg, lr: 0.1}\n")
    sources = key_sources(load_config(path, [], (given := {})), given)
    assert sources["strategy.base_options.lr"] == "file dp.yaml"
    assert sources["strategy.base_options.every"] == "default of strategy ccvr"
    # a swept mapping (--dry-run's sweep labels) replaces what was given under its key, then labels its own keys
    given = {"strategy.base_options.lr": "file dp.yaml", "strategy.base_options": "file dp.yaml", "seed": "override"}
    set_given(given, "strategy.base_options", {"base": "fedavg", "x": {}}, "sweep")
    assert given == {"seed": "override", "strategy.base_options.base": "sweep"}
