"""One registry per component kind: ``register`` / ``create`` / ``list``.

A :class:`Registry` maps ``(kind, name)`` to a component class, the pydantic
``Params`` model it declares, and where it came from (``vqgen`` for the
built-ins, the distribution name for an entry-point plugin). The default,
process-wide registry is built lazily by :func:`default_registry`, which loads
the built-in plugins and every installed plugin package.

A component that builds others (a conditioner its own tokenizer, the rejection sampler
its inner sampler, a chain its steps) takes them from :func:`current_registry`: the
registry that is building it (:meth:`Registry.create`, wiring in
:meth:`Registry.building`), so a custom registry passed to ``train`` or ``load_run``
reaches every nested component; outside construction it is the default registry.
"""

from __future__ import annotations

import difflib
import fnmatch
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import (
    Conditioner,
    Ordering,
    ParamsModel,
    Prior,
    Sampler,
    Tokenizer,
)

__all__ = [
    "KINDS",
    "ComponentError",
    "Entry",
    "Registry",
    "create",
    "current_registry",
    "default_registry",
    "list_components",
    "register",
]

#: The kinds of component, each with the base class its members must subclass
#: (``None``: any class with a ``Params`` model, e.g. a torch ``Dataset``).
KINDS: dict[str, type | None] = {
    "tokenizer": Tokenizer,
    "prior": Prior,
    "conditioner": Conditioner,
    "ordering": Ordering,
    "sampler": Sampler,
    "dataset": None,
}

T = TypeVar("T", bound=type)

#: The registry building a component right now (see :func:`current_registry`).
_building: ContextVar[Registry | None] = ContextVar("vqgen_building_registry", default=None)


class ComponentError(VqgenError):
    """An unknown kind or name, a duplicate, or params a component rejects."""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    cls: type
    source: str  # "vqgen", a distribution name, or "<runtime>"

    @property
    def params_model(self) -> type[ParamsModel]:
        return self.cls.Params  # type: ignore[attr-defined,no-any-return]

    @property
    def summary(self) -> str:
        """First line of the class docstring."""
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ComponentError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def format_validation_error(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Pydantic errors as ``(dotted.path, reason)`` pairs, each path under ``prefix``."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        reason = e["msg"]
        if e["type"] not in ("missing", "extra_forbidden") and "input" in e:
            reason += f" (got {e['input']!r})"
        out.append((path, reason))
    return out


class Registry:
    """Components by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        #: Plugins that failed to import or to register: ``(plugin, error)``.
        self.failures: list[tuple[str, str]] = []
        #: Plugins loaded: plugin name → where it came from ("built-in",
        #: "<distribution> <version>" or "$VQGEN_PLUGINS").
        self.plugins: dict[str, str] = {}
        self._source = "<runtime>"

    # -- registration -------------------------------------------------------
    def add(self, kind: str, name: str, cls: type, *, source: str | None = None) -> None:
        """Register ``cls`` as component ``name`` of ``kind``."""
        _check_kind(kind)
        where = source or self._source
        if not isinstance(name, str) or not name:
            raise ComponentError(f"{kind} name must be a non-empty string, got {name!r}")
        base = KINDS[kind]
        if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
            raise ComponentError(
                f"cannot register {cls!r} as {kind} {name!r} (from {where}): "
                f"it must subclass vqgen.{base.__name__}"
            )
        params = getattr(cls, "Params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise ComponentError(
                f"{kind} {name!r} (from {where}) must declare a pydantic `Params` model"
            )
        if params.model_config.get("extra") != "forbid":
            raise ComponentError(
                f"{kind} {name!r} (from {where}): its Params must set extra='forbid' "
                "(subclass vqgen.ParamsModel)"
            )
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise ComponentError(
                f"duplicate {kind} name {name!r}: already registered by {existing.source} "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}), "
                f"registered again by {where} ({cls.__module__}.{cls.__qualname__})"
            )
        self._entries[kind][name] = Entry(kind, name, cls, where)

    def register(self, kind: str, name: str) -> Callable[[T], T]:
        """Class decorator: ``@registry.register("ordering", "snake")``."""

        def deco(cls: T) -> T:
            self.add(kind, name, cls)
            return cls

        return deco

    def copy(self) -> Registry:
        """An independent registry with the same entries (e.g. to add test components)."""
        new = Registry()
        new._entries = {k: dict(v) for k, v in self._entries.items()}
        new.failures = list(self.failures)
        new.plugins = dict(self.plugins)
        return new

    def scoped(self, source: str) -> _Scoped:
        """A view that registers with ``source`` as the origin (used for plugins)."""
        return _Scoped(self, source)

    # -- lookup -------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        """The entry for ``name``; an unknown name raises with the close matches."""
        _check_kind(kind)
        try:
            return self._entries[kind][name]
        except (KeyError, TypeError):
            known = sorted(self._entries[kind])
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            avail = ", ".join(known) if known else "none registered"
            raise ComponentError(
                f"unknown {kind} {name!r}{hint} (available: {avail})"
            ) from None

    def list(self, kind: str, pattern: str = "*") -> list[str]:
        """Sorted names of ``kind`` matching the fnmatch ``pattern``."""
        _check_kind(kind)
        return sorted(n for n in self._entries[kind] if fnmatch.fnmatchcase(n, pattern))

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        """Every entry (of one kind, or of all kinds in ``KINDS`` order)."""
        for k in [kind] if kind else KINDS:
            _check_kind(k)
            yield from (self._entries[k][n] for n in sorted(self._entries[k]))

    def name_of(self, obj: Any) -> tuple[str, str]:
        """``(kind, name)`` under which ``obj``'s class is registered."""
        cls = obj if isinstance(obj, type) else type(obj)
        for e in self.entries():
            if e.cls is cls:
                return e.kind, e.name
        raise ComponentError(f"{cls.__qualname__} is not a registered component")

    # -- construction -------------------------------------------------------
    def validate_params(
        self, kind: str, name: str, params: BaseModel | dict[str, Any] | None = None
    ) -> ParamsModel:
        """``params`` validated against the component's ``Params`` model."""
        model = self.get(kind, name).params_model
        if isinstance(params, model):
            return params
        if isinstance(params, BaseModel):
            params = params.model_dump()
        if params is not None and not isinstance(params, dict):
            raise ComponentError(
                f"params of {kind} {name!r} must be a mapping, got {type(params).__name__}"
            )
        try:
            return model.model_validate(params or {})
        except ValidationError as err:
            lines = "; ".join(f"{p}: {r}" for p, r in format_validation_error(err, "params"))
            raise ComponentError(f"invalid params for {kind} {name!r}: {lines}") from None

    def create(
        self, kind: str, name: str, params: BaseModel | dict[str, Any] | None = None
    ) -> Any:
        """Build component ``name`` of ``kind`` from ``params`` (a dict or its Params)."""
        entry = self.get(kind, name)
        p = self.validate_params(kind, name, params)
        fields = {k: getattr(p, k) for k in type(p).model_fields}
        with self.building():
            return entry.cls(**fields)

    @contextmanager
    def building(self) -> Iterator[Registry]:
        """Within this block :func:`current_registry` is this registry: components built
        or wired here take their nested components from it."""
        token = _building.set(self)
        try:
            yield self
        finally:
            _building.reset(token)


class _Scoped:
    """The registry seen by one plugin: registrations carry the plugin's source."""

    def __init__(self, registry: Registry, source: str) -> None:
        self._registry = registry
        self.source = source
        self.added: list[tuple[str, str]] = []

    def add(self, kind: str, name: str, cls: type) -> None:
        self._registry.add(kind, name, cls, source=self.source)
        self.added.append((kind, name))

    def rollback(self) -> None:
        """Remove everything this view registered (its plugin failed part-way)."""
        for kind, name in self.added:
            self._registry._entries[kind].pop(name, None)
        self.added.clear()

    def register(self, kind: str, name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            self.add(kind, name, cls)
            return cls

        return deco

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._registry, attr)


_default: Registry | None = None
_lock = threading.Lock()


def default_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, with built-in and installed plugins loaded."""
    global _default
    with _lock:
        if _default is None or reload:
            from vqgen.core.plugins import load_plugins

            reg = Registry()
            load_plugins(reg)
            _default = reg
        return _default


def current_registry() -> Registry:
    """The registry to build nested components from: the one building the component
    under construction, else the default registry."""
    building = _building.get()
    return building if building is not None else default_registry()


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator registering into the default registry (for in-process use)."""
    return default_registry().register(kind, name)


def create(kind: str, name: str, params: BaseModel | dict[str, Any] | None = None) -> Any:
    """Build a component from the default registry: ``create("ordering", "row_major")``."""
    return default_registry().create(kind, name, params)


def list_components(kind: str, pattern: str = "*") -> list[str]:
    """Names of ``kind`` in the default registry matching ``pattern`` (fnmatch)."""
    return default_registry().list(kind, pattern)

