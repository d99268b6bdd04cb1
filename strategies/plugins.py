"""One plug-in mechanism: built-ins by name, installed packages by entry point, any `module:attr`.

Every pluggable kind (models, datasets, continual scenarios, DST rules, merge rules,
strategies) is a `Registry`. A name in the run config resolves, in this order, to

1. ``"package.module:attr"`` -- imported with importlib (``attr`` may be dotted);
2. a built-in registered with ``Registry.register`` (leanfed's own models, rules, ...);
3. an entry point of the registry's group (``leanfed.models``, ``leanfed.datasets``,
   ``leanfed.scenarios``, ``leanfed.dst_rules``, ``leanfed.merge_rules``,
   ``leanfed.strategies``) declared by an installed distribution.

Errors a user can cause are one line (`PluginError`) naming the config key, the missing
module or attribute. Options (``model.options.hidden = 64`` ...) are checked against the
factory's signature with `check_options` before round 1. Lives in strategies/ (pure
Python, no torch) so that strategies.aggregation and tasks/ can both register into it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

__all__ = ["PluginError", "Registry", "check_options", "load_object", "option_kwargs"]

T = TypeVar("T")

GROUPS = (
    "leanfed.models",
    "leanfed.datasets",
    "leanfed.scenarios",
    "leanfed.dst_rules",
    "leanfed.merge_rules",
    "leanfed.strategies",
    "leanfed.vote_rules",
)


class PluginError(ValueError):
    """A plug-in name cannot be resolved, or its options do not fit its factory."""


def load_object(spec: str, key: str) -> Any:
    """Import ``"package.module:attr"`` (attr may be dotted); ``key`` names the config entry."""
    module, sep, attr = spec.partition(":")
    if not sep or not module.strip() or not attr.strip():
        raise PluginError(f"{key} = {spec!r}: expected 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise PluginError(
            f"{key} = {spec!r}: no module named {missing!r} (install it, put it on PYTHONPATH, "
            "or ship it inside the Flower app)"
        ) from exc
    except Exception as exc:  # a user module may raise anything while importing
        raise PluginError(
            f"{key} = {spec!r}: importing {module!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{key} = {spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _entry_points(groups: tuple[str, ...]) -> dict[str, EntryPoint]:
    # Not cached: a test (or a user) may add a distribution to sys.path at run time.
    found: dict[str, EntryPoint] = {}
    for group in reversed(groups):  # the first group wins a name clash
        found |= {ep.name: ep for ep in entry_points(group=group)}
    return found


class Registry(Generic[T]):
    """Built-ins by name + entry points of its group(s) + ``module:attr`` strings, one lookup."""

    def __init__(self, kind: str, group: str | tuple[str, ...], key: str) -> None:
        groups = (group,) if isinstance(group, str) else tuple(group)
        bad = [g for g in groups if g not in GROUPS]
        if bad or not groups:
            raise ValueError(f"unknown entry-point group(s) {bad}; known: {GROUPS}")
        self.kind, self.groups, self.key = kind, groups, key
        self.group = " / ".join(groups)
        self._builtins: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """``reg.register("name", obj)``, or as a decorator ``@reg.register("name")``."""
        if ":" in name or not name:
            raise ValueError(f"{self.kind} name {name!r} must be non-empty and contain no ':'")

        def add(o: T) -> T:
            if name in self._builtins and self._builtins[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builtins[name] = o
            return o

        return add if obj is None else add(obj)

    def builtin_names(self) -> list[str]:
        return list(self._builtins)

    def names(self) -> list[str]:
        """Built-ins first, then installed entry points."""
        return self.builtin_names() + sorted(set(_entry_points(self.groups)) - set(self._builtins))

    def is_builtin(self, name: str) -> bool:
        return name in self._builtins

    def resolve(self, spec: str) -> T:
        """The object a config value names; `PluginError` (one line) when it cannot."""
        if not isinstance(spec, str) or not spec:
            raise PluginError(f"{self.key} = {spec!r}: expected a {self.kind} name")
        if ":" in spec:
            return load_object(spec, self.key)
        if spec in self._builtins:
            return self._builtins[spec]
        eps = _entry_points(self.groups)
        if spec in eps:
            try:
                return eps[spec].load()
            except Exception as exc:
                raise PluginError(
                    f"{self.key} = {spec!r}: entry point {eps[spec].value!r} ({eps[spec].group}) "
                    "failed to load: {type(exc).__name__}: {exc}"
                ) from exc
        known = ", ".join(self.names())
        raise PluginError(
            f"{self.key} = {spec!r}: unknown {self.kind}; known: {known}; or name your own as "
            f"'package.module:attr' (or an entry point in group {self.group!r})"
        )


def option_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Run-config option names use hyphens (``label-column``); Python keywords use ``_``."""
    return {k.replace("-", "_"): v for k, v in options.items()}


def check_options(
    factory: Callable[..., Any], num_positional: int, options: Mapping[str, Any], key: str
) -> None:
    """Raise `PluginError` unless ``factory(<num_positional args>, **options)`` would bind.

    Also catches a scalar option whose default has another type (``hidden = "x"`` for an
    int default); bool and int/float mixes are refused too, except int for a float default.
    """
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    kwargs = option_kwargs(options)
    params = list(sig.parameters.values())
    takes = [
        p.name.replace("_", "-")
        for i, p in enumerate(params)
        if i >= num_positional and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    name = getattr(factory, "__qualname__", repr(factory))
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unknown = sorted(o for o in options if o.replace("-", "_") not in sig.parameters)
        if unknown:
            raise PluginError(
                f"{key}: {name} does not accept options {unknown}; its options: {takes or 'none'}"
            )
    try:
        sig.bind(*([None] * num_positional), **kwargs)
    except TypeError as exc:
        raise PluginError(f"{key}: cannot call {name} with {sorted(options)} ({exc})") from None
    for pname, value in kwargs.items():
        param = sig.parameters.get(pname)
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            continue
        want = type(param.default)
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if want in (int, float, str, bool) and not ok:
            raise PluginError(
                f"{key}.{pname.replace('_', '-')} = {value!r}: expected {want.__name__} "
                f"(like its default {param.default!r})"
            )
