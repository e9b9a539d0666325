"""One tiny name -> factory registry, used by models, losses and datasets.

A name is either a registered short name (``resnet20``) or an import path
``package.module:Attr`` naming a user's own factory or class, so no fork of
kdflow is needed to plug in a model or a loss.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from .errors import InputError  # relative: ships inside registered models


class Registry:
    """Maps names to factories for one kind of thing (``model``, ``loss``, ``dataset``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@MODELS.register("mlp")`` records the factory under ``name``."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        """The registered short names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items or ":" in name

    def get(self, name: str) -> Callable[..., Any]:
        """The factory for ``name``; ``pkg.mod:Attr`` is imported. Unknown names raise
        `InputError` listing the closest registered names."""
        if name in self._items:
            return self._items[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise InputError(f"{self.kind} {name!r}: cannot import module {module_name!r} ({e})") from None
            if not hasattr(module, attr):
                raise InputError(f"{self.kind} {name!r}: module {module_name!r} has no {attr!r}")
            return getattr(module, attr)
        close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(
            f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())}; "
            f"or name your own as package.module:Class)"
        )
