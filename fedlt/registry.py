"""Name -> object registries for models, data sets, losses, client methods and strategies.

A plug-in registers itself in one line::

    @STRATEGIES.register("my_strategy")
    class MyStrategy(FedLTStrategy): ...

Plug-in packages, fedlt's own ``clients`` and ``strategies`` included (pyproject.toml), add theirs through
the entry-point group ``fedlt.plugins``: each entry point names a module, which is imported (and so
registers what it defines) the first time a registry is read. The core never imports a plug-in by name.
"""

from __future__ import annotations

import importlib
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from fedlt.errors import FedLTError
from fedlt.options import CentralizedOptions, ClientOptions, DataOptions, HeadOptions, Options, StrategyOptions

T = TypeVar("T")
ENTRY_POINT_GROUP = "fedlt.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import fedlt's own registering modules and every module named in the ``fedlt.plugins`` entry points."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import fedlt.centralized  # noqa: F401  (registers the centralized methods)
    import fedlt.data.catalog  # noqa: F401  (registers the data sets)
    import fedlt.losses  # noqa: F401  (registers the losses)
    import fedlt.models  # noqa: F401  (registers the models)
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except (Exception, SystemExit) as exc:
            raise _plugin_error(ep.value, exc, f" (entry point {ep.name!r} of {ENTRY_POINT_GROUP!r})",
                                "fix the module or uninstall its package") from None
        names.append(ep.name)
    if not {"clients", "strategies"} <= set(names):  # fedlt's own plug-ins come through the same door
        raise FedLTError(f"fedlt's built-in plug-ins (clients, strategies) are missing from the {ENTRY_POINT_GROUP!r} "
                         f"entry points of the installed package (found: {', '.join(names) or 'none'}); its metadata "
                         f"is stale or absent: reinstall it with pip install -e .")


def import_plugins(modules: list[str]) -> None:
    """Import the plug-in modules a config names (``plugins: [...]``); each registers what it defines."""
    load_plugins()
    for name in modules:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # sys.exit() in a module would end fedlt without a word
            raise _plugin_error(name, exc) from None


def _plugin_error(module: str, exc: Exception | SystemExit, how: str = "",
                  advice: str = "fix the module or drop it from plugins") -> FedLTError:
    """One line for a plug-in module that cannot be imported, or that raised while it was imported (a syntax error,
    a name registered twice, its own exception): the exception and the plug-in's line that raised it."""
    if isinstance(exc, FedLTError):
        return exc
    if isinstance(exc, ImportError):
        return FedLTError(f"cannot import plug-in module {module!r}{how}: {exc}")
    if isinstance(exc, SyntaxError):
        where, message = f"{exc.filename}:{exc.lineno}", exc.msg
    else:
        own = str(Path(__file__).parent)  # fedlt's own frames (e.g. Registry.register) say less than the plug-in's
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.startswith(("<frozen", own))] or traceback.extract_tb(exc.__traceback__)
        where, message = f"{frames[-1].filename}:{frames[-1].lineno}", (str(exc).splitlines() or [""])[0]
        if isinstance(exc, SystemExit):  # sys.exit(code) in the module
            message = f"exit status {exc.code!r}, which would end fedlt"
    return FedLTError(f"plug-in module {module!r}{how} raised {type(exc).__name__} while it was imported, at {where}: "
                      f"{message}; {advice}")


class Registry(Generic[T]):
    """A named table of objects of one kind, with optional metadata per entry."""

    def __init__(self, kind: str, plural: str | None = None, base_options: type[Options] = Options) -> None:
        self.kind = kind
        self.plural = plural or kind + "s"
        self.base_options = base_options
        self._items: dict[str, T] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered: register yours under another name")
            self._items[name] = o
            self.meta[name] = meta
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            raise FedLTError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def options(self, name: str) -> type[Options]:
        """The ``Options`` model of entry ``name``: its class attribute ``Options``, else the ``options=`` it was
        registered with, else the registry's base."""
        obj = self.get(name)
        return getattr(obj, "Options", None) or self.meta[name].get("options") or self.base_options

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(sorted(self._items))


MODELS: Registry[Callable[..., Any]] = Registry("model", base_options=HeadOptions)
DATASETS: Registry[Callable[..., Any]] = Registry("data set", base_options=DataOptions)
LOSSES: Registry[Callable[..., Any]] = Registry("loss", "losses")
CLIENTS: Registry[Any] = Registry("client method", base_options=ClientOptions)
STRATEGIES: Registry[Any] = Registry("strategy", "strategies", base_options=StrategyOptions)
CENTRALIZED: Registry[Any] = Registry("centralized method", base_options=CentralizedOptions)

ALL = (DATASETS, MODELS, LOSSES, CLIENTS, STRATEGIES, CENTRALIZED)
