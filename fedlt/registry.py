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
import importlib.util
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from fedlt.errors import FedLTError, did_you_mean
from fedlt.options import CentralizedOptions, ClientOptions, DataOptions, HeadOptions, Options, StrategyOptions

T = TypeVar("T")
ENTRY_POINT_GROUP = "fedlt.plugins"
BUILT_IN_PLUGINS = {"clients": "client method", "strategies": "strategy"}
"""fedlt's own entry-point modules (top-level packages beside ``fedlt``) -> the kind of part each holds."""
_plugins_loaded: bool | FedLTError = False  # True once loaded; the error of a failed load, raised again by every call


def load_plugins() -> None:
    """Import fedlt's own registering modules and every module named in the ``fedlt.plugins`` entry points.

    A failure (a plug-in that raises while imported, fedlt's own ``clients`` / ``strategies`` shadowed by a
    folder of that name, stale metadata) is a one-line :class:`FedLTError`, raised again by every later call:
    the registries it leaves half filled are never read as if complete."""
    global _plugins_loaded
    if isinstance(_plugins_loaded, FedLTError):
        raise _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before the imports: a plug-in that reads a registry while imported must not recurse
    try:
        _load_entry_points()
    except FedLTError as exc:
        _plugins_loaded = exc
        raise


def _load_entry_points() -> None:
    """:func:`load_plugins`' work: the core's registering modules, then each entry point's module."""
    import fedlt.centralized  # noqa: F401  (registers the centralized methods)
    import fedlt.data.catalog  # noqa: F401  (registers the data sets)
    import fedlt.losses  # noqa: F401  (registers the losses)
    import fedlt.models  # noqa: F401  (registers the models)
    for name in BUILT_IN_PLUGINS:  # before any plug-in runs (fedlt's strategies import its clients)
        _check_not_shadowed(name)
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


def _module_path(name: str) -> Path | None:
    """Where the top-level module ``name`` is (or would be) imported from, found without running it: a package's
    folder (a namespace package's first folder), a plain module's file; None where it is not found or has no
    place on disk (built in, frozen)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec (made by hand)
        return None
    if spec is None:
        return None
    if spec.origin and spec.has_location:
        path = Path(spec.origin).resolve()
        return path.parent if spec.submodule_search_locations is not None else path
    portions = list(spec.submodule_search_locations or [])
    return Path(portions[0]).resolve() if portions else None


def _check_not_shadowed(name: str) -> None:
    """fedlt's built-in plug-ins are the top-level packages ``clients`` and ``strategies``, beside the ``fedlt``
    package (in a checkout and in site-packages alike). A folder or module of the same name earlier on the import
    path (the working directory of a project laid out as the README's ``strategies/<name>.py``, or PYTHONPATH) is
    imported in their place, and would hide every built-in method behind an ``unknown strategy 'fedavg'``: a
    one-line error naming it instead."""
    own = Path(__file__).resolve().parents[1] / name
    found = _module_path(name)
    if found is None or found == own or not own.is_dir():  # not beside fedlt (a layout of its own): cannot tell
        return
    kind = BUILT_IN_PLUGINS[name]
    raise FedLTError(f"{found} shadows fedlt's built-in plug-in package {name!r} ({own}): Python imports it in its "
                     f"place (it comes first on the import path: the working directory or PYTHONPATH), which hides "
                     f"every built-in {kind}; rename that folder (e.g. my_{name}, then plugins=[my_{name}.<module>]) "
                     f"or run from another directory")


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


_PARENT_OPTIONS = {"strategy": "FedLTStrategy.Options", "client method": "ClientMethod.Options",
                   "centralized method": "CentralizedMethod.Options"}
"""The Options a class registered in the registry of that kind subclasses (:meth:`Registry._check_options`' hint)."""


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class Registry(Generic[T]):
    """A named table of objects of one kind, with optional metadata per entry."""

    def __init__(self, kind: str, plural: str | None = None, base_options: type[Options] = Options) -> None:
        self.kind = kind
        self.plural = plural or kind + "s"
        self.base_options = base_options
        self._items: dict[str, T] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator. Its ``Options`` (class attribute or
        ``options=``) must subclass the registry's ``base_options``: checked here, so that a plug-in's mistake is
        one line naming its module's line (:func:`_plugin_error`), not a traceback or a config error later."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered: register yours under another name")
            self._check_options(name, o, meta)
            self._items[name] = o
            self.meta[name] = meta
            return o

        return add if obj is None else add(obj)

    def _check_options(self, name: str, obj: Any, meta: dict[str, Any]) -> None:
        """A ``TypeError`` naming the entry, its class and the base class its ``Options`` must subclass, where they
        do not: a plain pydantic ``BaseModel`` lacks the config's checks (and ``name``), a bare
        :class:`~fedlt.options.Options` lacks the section's ``name`` key."""
        options = getattr(obj, "Options", None) or meta.get("options")
        if isinstance(options, type) and issubclass(options, self.base_options):
            self._check_core_types(name, options)
            return
        if options is None:
            return
        owner = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        given = (f"subclasses {', '.join(f'{b.__module__}.{b.__qualname__}' for b in options.__bases__)}"
                 if isinstance(options, type) else f"is {options!r}, not a class")
        parent = _PARENT_OPTIONS.get(self.kind)
        hint = f" (its parent's, e.g. class Options({parent}))" if parent else ""
        raise TypeError(f"{self.kind} {name!r} ({owner}): its Options {getattr(options, '__qualname__', '')} "
                        f"{given}; it must subclass {self.base_options.__module__}.{self.base_options.__qualname__}"
                        f"{hint}")

    def _check_core_types(self, name: str, options: type[Options]) -> None:
        """A ``TypeError`` where ``options`` declares a key of the registry's ``base_options`` (a core key, e.g.
        ``centralized.epochs``) with another type: another default is a method's own choice, another type breaks
        the configs and sweeps written for every method (``epochs: int`` refused ``centralized.epochs=1.5``)."""
        for key, field in options.model_fields.items():
            core = self.base_options.model_fields.get(key)
            if core is not None and field.annotation != core.annotation:
                raise TypeError(f"{self.kind} {name!r}: its Options declare the core key {key!r} as "
                                f"{_type_name(field.annotation)}, where every {self.kind} takes "
                                f"{_type_name(core.annotation)}: keep its type (a default of its own is fine), or "
                                f"give the key another name")

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            close = did_you_mean(name, self._items) if isinstance(name, str) else ""
            raise FedLTError(f"unknown {self.kind} {name!r}{close}; known: {', '.join(sorted(self._items))} (a "
                             f"plug-in of your own: name its module in plugins=[module])")
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
