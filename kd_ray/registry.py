"""A name -> object registry that refuses duplicates, lists choices, and loads ``pkg.module:attr`` plugins."""
from __future__ import annotations

import importlib
from typing import Any, Dict, Generic, Iterator, TypeVar

from kd_ray.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name, for one kind of thing ("model", "dataset", "loss": the word errors use).

    kd_ray's registries: ``METHODS`` (kd_ray.methods.base, the ``distill.loss`` names),
    ``MODELS`` (kd_ray.models.zoo) and ``DATASETS`` (kd_ray.data.sources). ``get`` of a name
    with a colon imports a plugin instead; an unknown name is a ConfigError listing the choices.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as ``@reg.register("name")``."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """The registered object, or the plugin ``package.module:attribute`` imported."""
        if is_plugin(name):
            return import_object(name)
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))} "
                "(or a plugin 'package.module:attribute')"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted (plugins are not listed)."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items or is_plugin(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def is_plugin(name: str) -> bool:
    """Whether ``name`` is a plugin spec ``package.module:attribute`` (it has a colon)."""
    return ":" in str(name)


def import_object(spec: str) -> Any:
    """Import ``package.module:attribute`` (user plugins)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"plugin {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for plugin {spec!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (plugin {spec!r})") from None
