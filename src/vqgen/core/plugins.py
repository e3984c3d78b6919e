"""Plugin discovery: built-ins first, then installed packages via entry points.

Installed plugins are found with ``importlib.metadata`` through pluggy's
``load_setuptools_entrypoints`` (group ``vqgen.plugins``), one entry point at a
time so that a plugin which fails to import is recorded with its distribution
name and error while every other plugin still loads. Setting
``VQGEN_DISABLE_PLUGIN_AUTOLOAD=1`` skips installed plugins; the built-ins
always load. ``VQGEN_PLUGINS=mod_a,mod_b`` loads plugin modules by import name
without packaging them (handy for a project's own components and for tests);
it is honoured even when autoload is disabled.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import warnings
from typing import Any

import pluggy

from vqgen.core import hookspecs

__all__ = ["BUILTIN_PLUGINS", "DISABLE_ENV", "MODULES_ENV", "load_plugins", "plugin_manager"]

log = logging.getLogger(__name__)

#: Modules holding the built-in components, imported by name: core knows no
#: concrete plugin, only where the built-in ones live.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "vqgen.plugins",
    "vqgen.orderings",
    "vqgen.samplers",
    "vqgen.conditioners",
)
DISABLE_ENV = "VQGEN_DISABLE_PLUGIN_AUTOLOAD"
MODULES_ENV = "VQGEN_PLUGINS"


def plugin_manager() -> pluggy.PluginManager:
    """A fresh pluggy manager with the vqgen hook specifications."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, str, str]]:
    """``(entry point, distribution name, version)`` for group ``vqgen.plugins``."""
    found = []
    seen = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == hookspecs.ENTRY_POINT_GROUP and ep.name not in seen:
                seen.add(ep.name)
                found.append((ep, dist.metadata["Name"] or "?", dist.version or "?"))
    return found


def load_plugins(registry: Any, pm: pluggy.PluginManager | None = None) -> pluggy.PluginManager:
    """Load built-in and installed plugins and call their ``vqgen_register`` hooks.

    Failures are appended to ``registry.failures`` as ``(plugin, message)`` and
    reported as a warning; they never stop the other plugins. A plugin whose hook
    raises part-way registers none of its components.
    """
    pm = pm or plugin_manager()
    sources: dict[str, str] = {}

    for modname in BUILTIN_PLUGINS:
        try:
            pm.register(importlib.import_module(modname), name=modname)
        except Exception as exc:  # a broken built-in is a bug, but keep the rest usable
            registry.failures.append((modname, f"{type(exc).__name__}: {exc}"))
            continue
        sources[modname] = "vqgen"
        registry.plugins[modname] = "built-in"

    if not _autoload_disabled():
        for ep, dist, version in _entry_points():
            label = f"{ep.name} (distribution {dist} {version}, entry point {ep.value})"
            try:
                pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP, name=ep.name)
            except Exception as exc:
                registry.failures.append((label, f"failed to import: {type(exc).__name__}: {exc}"))
                continue
            if pm.has_plugin(ep.name):
                sources[ep.name] = dist
                registry.plugins[ep.name] = f"{dist} {version}"

    for modname in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV, "").split(","))):
        try:
            pm.register(importlib.import_module(modname), name=modname)
        except Exception as exc:
            label = f"{modname} (from ${MODULES_ENV})"
            registry.failures.append((label, f"failed to import: {type(exc).__name__}: {exc}"))
            continue
        sources[modname] = modname
        registry.plugins[modname] = f"${MODULES_ENV}"

    for impl in pm.hook.vqgen_register.get_hookimpls():
        source = sources.get(impl.plugin_name, impl.plugin_name)
        scoped = registry.scoped(source)
        try:
            impl.function(registry=scoped)
        except Exception as exc:
            scoped.rollback()  # all of a plugin's components, or none
            registry.failures.append(
                (f"{impl.plugin_name} (from {source})", f"vqgen_register failed: {exc}")
            )

    for plugin, message in registry.failures:
        warnings.warn(f"vqgen plugin {plugin}: {message}", RuntimeWarning, stacklevel=2)
    return pm
