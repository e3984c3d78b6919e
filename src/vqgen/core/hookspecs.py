"""The plugin contract: pluggy hook specifications for project ``vqgen``.

A plugin is a module (or object) with functions marked ``@hookimpl``. Installed
packages advertise it in the entry-point group ``vqgen.plugins``::

    [project.entry-points."vqgen.plugins"]
    my_plugin = "my_package.vqgen_plugin"

The built-in components register through this same hook.
"""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "hookimpl", "hookspec"]

PROJECT = "vqgen"
ENTRY_POINT_GROUP = "vqgen.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vqgen_register(registry: Any) -> None:
    """Register this plugin's components.

    ``registry`` offers ``add(kind, name, cls)`` and the decorator
    ``register(kind, name)``. ``kind`` is one of ``tokenizer``, ``prior``,
    ``conditioner``, ``ordering``, ``sampler``, ``dataset``. Each class must
    subclass the interface of its kind (any class for ``dataset``), declare a
    pydantic ``Params`` model with ``extra="forbid"`` (subclass
    ``vqgen.ParamsModel``), and take exactly those fields as keyword arguments.
    A name already registered by another plugin is an error.
    """
