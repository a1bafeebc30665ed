"""Loading plugins, the registries they fill, and the per-run hook caller.

Plugins are modules. The built-in ones (``batchkin.plugins.*``) and every module
listed in the ``batchkin`` entry-point group of an installed distribution are
loaded into one pluggy manager, whose registration hooks fill three registries:
methods, models and datasets. A dataset's entry holds a :class:`DatasetLoader`,
which checks the dataset's own ``[data]`` keys and calls the plugin's loader.
Switches:

* ``BATCHKIN_DISABLE_PLUGIN_AUTOLOAD=1`` — load no entry points except batchkin's
  own built-ins;
* ``BATCHKIN_PLUGINS=path/a.py:path/b.py`` (or ``--plugin FILE`` on the CLI) — load
  plugin modules from local files. Nothing else is ever imported as a plugin.

For a run, the enabled methods are instantiated from their config tables and
registered into a fresh manager in reverse order, so that pluggy (which calls
the most recently registered implementation first) calls them in the config's
order; the engine's defaults are registered first with ``trylast``. Methods may
not use ``tryfirst``/``trylast``: the order is the config's. Every run hook is
called through pluggy's own hook caller (``RunHooks.pm.hook``), so pluggy's
tracing (``pm.trace`` with ``pm.enable_tracing()``) sees every call.

Errors are reported as one line naming where they came from: a plugin file that
fails to import (or calls ``sys.exit``), a registration hook that raises, a
dataset loader that raises (:class:`~batchkin.errors.DataError` naming the
dataset), and a method's run hook that raises or returns a bad loss term
(:class:`~batchkin.errors.PluginError` naming the method, its origin and the
hook). A plugin's own :class:`~batchkin.errors.BatchkinError` passes unchanged;
an allocation failure is left to the trainer's out-of-memory report.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from . import hookspecs
from .config import DATA_KEYS, DataConfig, dataset_options
from .errors import BatchkinError, ConfigError, DataError, PluginError, describe_exception, is_out_of_memory
from .schema import parse, shown, to_dict

ENTRY_POINT_GROUP = "batchkin"
ENV_NO_AUTOLOAD = "BATCHKIN_DISABLE_PLUGIN_AUTOLOAD"
ENV_PLUGINS = "BATCHKIN_PLUGINS"

# The built-in plugin modules (name -> module), loaded even when entry-point autoloading
# is off. batchkin's own entry points name the same modules and are not loaded twice.
BUILTIN_PLUGINS = {
    "datasets": "batchkin.data",
    "models": "batchkin.models",
    "ce": "batchkin.plugins.ce",
    "bbn": "batchkin.plugins.bbn",
    "batchformer": "batchkin.plugins.batchformer",
    "drloc": "batchkin.plugins.drloc",
    "moco": "batchkin.plugins.moco",
    "dino": "batchkin.plugins.dino",
    "sdmp": "batchkin.plugins.sdmp",
}

REGISTRATION_HOOKS = ("register_methods", "register_models", "register_datasets")


class Method:
    """Base class for a training method (optional: any class with hookimpls works).

    A method class has an ``Options`` dataclass (its config table's schema) and
    implements run hooks as methods decorated with ``@batchkin.hookimpl``. It is
    created once per run as ``cls(options)``.

    Class attributes:

    * ``roles`` — names of exclusive roles (e.g. ``{"ssl-base"}``); two enabled
      methods sharing a role are refused, naming both.
    * ``requires`` — names of methods of which at least one must be enabled too
      (e.g. SDMP needs ``moco`` or ``dino``).
    * ``raw_batch`` — ``True`` when the method builds its own inputs from the raw
      images (the SSL bases' view pipeline): while it is enabled the engine skips
      its crop, flip and normalisation and ``state.batch["x"]`` holds the uint8
      images as stored.
    """

    @dataclass
    class Options:
        pass

    roles: frozenset[str] = frozenset()
    requires: tuple[str, ...] = ()
    raw_batch: bool = False

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def state_dict(self) -> dict:
        """Everything needed to resume the method exactly (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass
class Entry:
    """One registered method, model or dataset."""

    name: str
    obj: object
    origin: str  # "builtin", "package <dist> <version>", or "file <path>"
    options: type | None = None


class DatasetLoader:
    """A registered dataset as the engine calls it: ``loader(data_config) -> ImageDataset``.

    ``data_config`` is the run's ``[data]`` table (:class:`batchkin.config.DataConfig`).
    Its dataset keys (``data_config.options``) are checked against the dataset's
    Options dataclass first; then the plugin's function (``self.loader``) is called:

    * registered with ``options=``: ``loader(options, data=data_config)``, ``options``
      the parsed Options instance (as a model builder gets its options first). The
      parsed options, every default filled in, replace ``data_config.options``, so
      the run's config.toml records them;
    * registered without: ``loader(data_config)``, and ``[data]`` may hold no key
      beyond the engine's.
    """

    def __init__(self, name: str, loader: Callable, options: type | None, registered: dict[str, Entry],
                 origin: str = "builtin"):
        self.name, self.loader, self.options, self.origin = name, loader, options, origin
        self._registered = registered  # the datasets registry, to name the owner of a stray key

    def __call__(self, data_config):
        given = getattr(data_config, "options", None) or {}
        others = {n: e.options for n, e in self._registered.items()}
        options = dataset_options(self.name, self.options, given, others)
        if options is not None and isinstance(data_config, DataConfig):
            data_config.options = to_dict(options)
        try:
            dataset = self.loader(data_config) if options is None else self.loader(options, data=data_config)
        except BatchkinError:
            raise
        except (Exception, SystemExit) as exc:  # the one place a loader's unexpected error becomes a DataError
            raise DataError(self._failure(exc)) from exc
        from .data import ImageDataset

        if not isinstance(dataset, ImageDataset):
            raise DataError(f"dataset {self.name!r} ({self.origin}) returned {type(dataset).__name__}, "
                            f"not a batchkin.data.ImageDataset")
        return dataset

    def _failure(self, exc: BaseException) -> str:
        where = f"dataset {self.name!r} ({self.origin})"
        if is_out_of_memory(exc):
            return f"{where} does not fit in the memory available ({describe_exception(exc)})"
        if isinstance(exc, OSError) and exc.filename is not None:
            return f"{where}: cannot read {exc.filename}: {exc.strerror or exc}"
        return f"{where} failed to load: {describe_exception(exc)}"

    def __repr__(self):
        return f"DatasetLoader({self.name!r}, {self.loader!r}, options={self.options!r})"


@dataclass
class Registry:
    methods: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


class Plugins:
    """The loaded plugin modules and the registries they filled."""

    def __init__(
        self,
        extra_files: Iterable[str | os.PathLike] = (),
        autoload: bool | None = None,
        extra_modules: Iterable = (),
    ):
        self.pm = _new_manager()
        self.origins: dict[str, str] = {}  # plugin name -> origin
        self.registry = Registry()
        if autoload is None:
            autoload = os.environ.get(ENV_NO_AUTOLOAD, "") in ("", "0", "false", "False")
        self.autoload = autoload
        for name, module in BUILTIN_PLUGINS.items():
            self._register_module(name, _import(module, "builtin"), "builtin")
        if autoload:
            self._load_entry_points()
        files = list(extra_files)
        env_files = os.environ.get(ENV_PLUGINS, "")
        files += [f for f in env_files.split(os.pathsep) if f]
        for path in files:
            self.load_file(path)
        for module in extra_modules:
            self._register_module(module.__name__.rpartition(".")[2], module, f"module {module.__name__}")
        self._collect()

    # -- loading ------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                origin = f"package {dist.metadata['Name']} {dist.version}"
                if ep.value in BUILTIN_PLUGINS.values():
                    continue  # already loaded as a built-in
                try:
                    module = ep.load()
                except (Exception, SystemExit) as exc:
                    raise PluginError(f"plugin {ep.name!r} from {origin} failed to import: {describe_exception(exc)}") from None
                self._register_module(ep.name, module, origin)

    def load_file(self, path: str | os.PathLike) -> None:
        """Load a plugin module from a local ``.py`` file."""
        path = Path(path)
        if path.is_dir():
            raise PluginError(f"plugin file {path} is a folder; give the plugin's .py file")
        if not path.is_file():
            raise PluginError(f"plugin file not found: {path}")
        modname = f"batchkin_local_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(modname, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin file {path} cannot be imported (not a Python file?)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # a plugin file must not end the run silently
            del sys.modules[modname]
            raise PluginError(f"plugin file {path} failed to import: {describe_exception(exc)}") from None
        self._register_module(path.stem, module, f"file {path}")

    def _register_module(self, name: str, module, origin: str) -> None:
        if self.pm.is_registered(module):
            return
        if self.pm.has_plugin(name):
            raise PluginError(f"two plugins are named {name!r}: {self.origins[name]} and {origin}")
        try:
            self.pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({origin}) is invalid: {exc}") from None
        unknown = [
            hook
            for hook in _hookimpl_names(module)
            if hook not in REGISTRATION_HOOKS
        ]
        if unknown:
            self.pm.unregister(module)
            raise PluginError(
                f"plugin {name!r} ({origin}) implements {', '.join(unknown)} at module level: "
                f"modules implement only {', '.join(REGISTRATION_HOOKS)}; run hooks belong on a method class"
            )
        self.origins[name] = origin

    def _collect(self) -> None:
        for hook, table in (
            ("register_methods", self.registry.methods),
            ("register_models", self.registry.models),
            ("register_datasets", self.registry.datasets),
        ):
            caller = getattr(self.pm.hook, hook)
            for impl in caller.get_hookimpls():  # registration order
                origin = self.origins.get(impl.plugin_name, impl.plugin_name)
                register = _make_register(hook, table, origin, impl.plugin_name)
                try:
                    impl.function(register)
                except PluginError:
                    raise
                except (Exception, SystemExit) as exc:
                    raise PluginError(f"plugin {impl.plugin_name!r} ({origin}) failed in {hook}: {describe_exception(exc)}") from None

    # -- queries ------------------------------------------------------------------------

    def method(self, name: str) -> Entry:
        return self.registry.methods[name]

    def model(self, name: str) -> Entry:
        if name not in self.registry.models:
            from .schema import suggest

            raise ConfigError(
                f"unknown model.name {name!r}{suggest(name, self.registry.models)}; "
                f"registered: {', '.join(sorted(self.registry.models))}"
            )
        return self.registry.models[name]

    def dataset(self, name: str) -> Entry:
        if name not in self.registry.datasets:
            from .schema import suggest

            raise ConfigError(
                f"unknown data.name {name!r}{suggest(name, self.registry.datasets)}; "
                f"registered: {', '.join(sorted(self.registry.datasets))}"
            )
        return self.registry.datasets[name]

    def method_hooks(self, name: str) -> list[str]:
        """The run hooks a registered method implements."""
        return _hookimpl_names(self.registry.methods[name].obj)


def _hookimpl_names(obj) -> list[str]:
    names = []
    for attr in dir(obj):
        if attr.startswith("_"):
            continue
        try:
            value = getattr(obj, attr)
        except Exception:
            continue
        if hasattr(value, f"{hookspecs.PROJECT}_impl"):
            names.append(attr)
    return names


def _make_register(hook: str, table: dict, origin: str, plugin: str) -> Callable:
    kind = hook.removeprefix("register_")[:-1]  # method / model / dataset

    def register(name, obj, options=None):
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"plugin {plugin!r} ({origin}) registered a {kind} with an invalid name {name!r}")
        if name in table:
            raise PluginError(f"{kind} {name!r} is registered twice: by {table[name].origin} and by {origin}")
        if kind == "method":
            options = getattr(obj, "Options", None)
            _validate_method_class(name, obj, origin)
        if options is not None and not dataclasses.is_dataclass(options):
            raise PluginError(f"{kind} {name!r} ({origin}): its options must be a dataclass, got {options!r}")
        if kind == "dataset":
            if not callable(obj):
                raise PluginError(f"dataset {name!r} ({origin}): the loader must be callable, got {obj!r}")
            clash = [f.name for f in dataclasses.fields(options) if f.name in DATA_KEYS] if options else []
            if clash:
                raise PluginError(
                    f"dataset {name!r} ({origin}): option {', '.join(map(repr, clash))} reuses the name of the "
                    f"engine's data.{clash[0]}; a dataset's options sit next to the engine's keys in [data]"
                )
            obj = DatasetLoader(name, obj, options, table, origin)
        table[name] = Entry(name, obj, origin, options)

    return register


def _validate_method_class(name: str, cls, origin: str) -> None:
    """Check a method class's hookimpls against the specs: unknown names, wrong arguments, ordering."""
    if not isinstance(cls, type):
        raise PluginError(f"method {name!r} ({origin}) must be registered as a class, got {type(cls).__name__}")
    pm = _new_manager()
    try:
        pm.register(cls, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"method {name!r} ({origin}) is invalid: {exc}") from None
    for impl_name in _hookimpl_names(cls):
        if impl_name in REGISTRATION_HOOKS:
            raise PluginError(f"method {name!r} ({origin}): {impl_name} is a module-level hook, not a method hook")
        opts = getattr(getattr(cls, impl_name), f"{hookspecs.PROJECT}_impl")
        if opts.get("tryfirst") or opts.get("trylast"):
            raise PluginError(
                f"method {name!r} ({origin}): {impl_name} uses tryfirst/trylast; the call order is the config's `methods` list"
            )
    options = getattr(cls, "Options", None)
    if options is not None and not dataclasses.is_dataclass(options):
        raise PluginError(f"method {name!r} ({origin}): Options must be a dataclass")


def _import(module: str, origin: str):
    try:
        return importlib.import_module(module)
    except (Exception, SystemExit) as exc:
        raise PluginError(f"plugin module {module} ({origin}) failed to import: {describe_exception(exc)}") from None


# ------------------------------------------------------------------------------ run hooks


FIRSTRESULT_HOOKS = tuple(
    name
    for name in dir(hookspecs)
    if getattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec", {}).get("firstresult")
)


class RunHooks:
    """The enabled methods of one run, called in the config's order."""

    def __init__(self, plugins: Plugins, names: list[str], method_options: dict, defaults):
        self.names = list(names)
        self.methods: dict[str, object] = {}
        self.origins = {name: plugins.method(name).origin for name in self.names}
        self.registry = plugins.registry  # where the run's dataset and model come from (run.json)
        for name in self.names:
            entry = plugins.method(name)
            options = parse(entry.options, method_options.get(name, {}), name) if entry.options else None
            try:
                self.methods[name] = entry.obj(options) if options is not None else entry.obj()
            except BatchkinError:
                raise
            except (Exception, SystemExit) as exc:
                raise PluginError(f"method {name!r} ({entry.origin}) failed to start: {describe_exception(exc)}") from None
        self._check_conflicts(plugins)
        self._sinks: dict[str, list] = {}  # hook name -> (method, result) pairs of the call in progress
        self.pm = _new_manager()
        self.pm.register(defaults, name="engine")
        for name in reversed(self.names):  # pluggy calls the last registered first
            self.pm.register(self.methods[name], name=name)
            self._guard(name)
        self.hook = self.pm.hook

    def _guard(self, name: str) -> None:
        """Wrap each of method ``name``'s hook implementations, as pluggy holds them, so that
        an unexpected exception becomes a PluginError naming the method and the hook, and
        so that :meth:`call_each` learns which method returned what. Pluggy still makes
        every call (its tracing sees it); ``argnames`` stay the original function's."""
        method, origin = self.methods[name], self.origins[name]
        for caller in self.pm.get_hookcallers(method) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is method and not (impl.hookwrapper or impl.wrapper):
                    impl.function = self._guarded(name, origin, caller.name, impl.function)

    def _guarded(self, name: str, origin: str, hook: str, function: Callable) -> Callable:
        def call(*args):
            try:
                result = function(*args)
            except BatchkinError:
                raise
            except (Exception, SystemExit) as exc:
                if is_out_of_memory(exc):
                    raise
                raise PluginError(f"method {name!r} ({origin}) failed in {hook}: {describe_exception(exc)}") from exc
            sink = self._sinks.get(hook)
            if sink is not None:
                sink.append((name, result))
            return result

        call.__wrapped__ = function
        return call

    def _check_conflicts(self, plugins: Plugins) -> None:
        owners: dict[str, str] = {}
        roles: dict[str, str] = {}
        for name, method in self.methods.items():
            for hook in _hookimpl_names(method):
                if hook in FIRSTRESULT_HOOKS:
                    if hook in owners:
                        raise PluginError(
                            f"methods {owners[hook]!r} and {name!r} conflict: both provide {hook} "
                            f"(only one method may own it)"
                        )
                    owners[hook] = name
            for role in getattr(method, "roles", ()):
                if role in roles:
                    raise PluginError(f"methods {roles[role]!r} and {name!r} conflict: both are a {role}")
                roles[role] = name
        for name, method in self.methods.items():
            needs = tuple(getattr(method, "requires", ()))
            if needs and not any(n in self.methods for n in needs):
                raise PluginError(f"method {name!r} needs one of {', '.join(repr(n) for n in needs)} in methods")

    def __getattr__(self, hook):  # state.hooks.transform_features(...) -> pm.hook call
        if hook.startswith("_") or hook in ("hook", "pm", "methods", "names", "origins", "registry"):
            raise AttributeError(hook)
        return getattr(self.hook, hook)

    def call_each(self, hook: str, **kwargs) -> list[tuple[str, object]]:
        """Call ``hook`` through pluggy (one call, the methods in the config's order) and return
        each enabled method's ``(name, result)``, ``None`` results included."""
        outer = self._sinks.get(hook)
        self._sinks[hook] = sink = []
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        finally:
            if outer is None:
                del self._sinks[hook]
            else:
                self._sinks[hook] = outer
        return sink

    def collect_loss_terms(self, state, outputs) -> tuple[dict, dict[str, str]]:
        """Fire ``loss_terms`` and merge the results: ``(terms, owner)``, ``owner[term]`` the
        method that returned it. Every term must be a one-element floating tensor and every
        name unique across methods; anything else is refused naming the method and the hook."""
        import torch

        terms: dict = {}
        owner: dict[str, str] = {}
        for name, result in self.call_each("loss_terms", state=state, outputs=outputs):
            if result is None:
                continue
            where = f"method {name!r} ({self.origins[name]}): loss_terms"
            if not isinstance(result, dict):
                raise PluginError(f"{where} must return a dict of named loss terms or None; "
                                  f"got {type(result).__name__} {shown(result)}")
            for key, value in result.items():
                if not isinstance(key, str):
                    raise PluginError(f"{where} named a loss term {shown(key)}; names must be strings")
                if not isinstance(value, torch.Tensor):
                    raise PluginError(f"{where} returned {key!r} as {type(value).__name__} {shown(value)}; a loss "
                                      f"term must be a scalar tensor computed from the model's outputs")
                if value.numel() != 1 or not value.is_floating_point():
                    raise PluginError(f"{where} returned {key!r} as a {value.dtype} tensor of shape "
                                      f"{list(value.shape)}; a loss term must be one floating-point value (reduce it, "
                                      f"e.g. with .mean())")
                if key in terms:
                    raise ConfigError(f"loss term {key!r} is produced by both {owner[key]!r} and {name!r}")
                terms[key], owner[key] = value, name
        if terms and torch.is_grad_enabled() and not any(t.requires_grad for t in terms.values()):
            methods = ", ".join(sorted(set(owner.values())))
            raise PluginError(f"no loss term depends on the model's parameters (loss_terms of {methods}: "
                              f"{', '.join(terms)}); nothing could be trained")
        return terms, owner

    def state_dicts(self) -> dict:
        return {name: m.state_dict() for name, m in self.methods.items() if hasattr(m, "state_dict")}

    def load_state_dicts(self, states: dict) -> None:
        for name, m in self.methods.items():
            if name in states and hasattr(m, "load_state_dict"):
                m.load_state_dict(states[name])
