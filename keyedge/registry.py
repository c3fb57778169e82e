"""Named registries of classes, filled by a decorator: the data beside the code (as timm's ``_registry.py``).

keyedge has three: export targets (:mod:`keyedge.exporters`), attacks (:mod:`keyedge.attacks`) and defenses
(:mod:`keyedge.defenses`).  All follow one rule: the registry holds **classes**, keyed by their ``name``
attribute; a lookup folds case and ``_``/``-`` (``APGD_CE`` finds ``apgd-ce``); an unknown name is one
:class:`~keyedge.errors.KeyedgeError` listing the known ones; each package exposes ``register_*``,
``list_*``, ``is_*`` and ``get_*`` queries over its registry, and callers ask the registry instead of
hard-coding names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from keyedge.errors import KeyedgeError

C = TypeVar("C", bound=type)


def fold(name: str) -> str:
    """The lookup form of a name: stripped, lower case, ``_`` as ``-``."""
    return str(name).strip().lower().replace("_", "-")


class Registry(Generic[C]):
    """Classes derived from ``base`` by name, in registration order.

    ``noun`` names one entry in messages (``"export target"``); ``aliases`` maps other spellings to names
    (``{"none": "keyed"}``); ``error`` is the :class:`KeyedgeError` subclass an unknown name raises.
    """

    def __init__(
        self,
        noun: str,
        base: type,
        *,
        aliases: Mapping[str, str] | None = None,
        error: type[KeyedgeError] = KeyedgeError,
        check: Callable[[C], None] | None = None,
    ):
        self.noun, self.base, self.error, self._check = noun, base, error, check
        self.aliases = {fold(k): fold(v) for k, v in (aliases or {}).items()}
        self._classes: dict[str, C] = {}

    def register(self, cls: C) -> C:
        """Class decorator: add ``cls`` under ``cls.name`` (a subclass of ``base``, named, not registered twice)."""
        name = getattr(cls, "name", "")
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or not name:
            raise TypeError(f"{cls!r} is not a named {self.base.__name__} subclass")
        if fold(name) != name:
            raise ValueError(f"{self.noun} name {name!r} must be lower case with '-', e.g. {fold(name)!r}")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.noun} {name!r} registered twice")
        if self._check is not None:
            self._check(cls)
        self._classes[name] = cls
        return cls

    def names(self, where: Callable[[C], bool] | None = None) -> list[str]:
        """Registered names in registration order; only those whose class satisfies ``where`` if given."""
        return [n for n, cls in self._classes.items() if where is None or where(cls)]

    def resolve(self, name: str) -> str | None:
        """The registered name ``name`` stands for (case, ``_``/``-`` and aliases folded), or None."""
        key = fold(name)
        key = self.aliases.get(key, key)
        return key if key in self._classes else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._classes))

    def items(self) -> list[tuple[str, C]]:
        """(name, class) pairs in registration order."""
        return list(self._classes.items())

    def __len__(self) -> int:
        return len(self._classes)

    def get(self, name: str) -> C:
        """The class registered as ``name``; one-line error naming the known ones otherwise."""
        key = self.resolve(name) if isinstance(name, str) else None
        if key is None:
            known = list(self._classes)
            choices = known[0] if len(known) == 1 else ", ".join(known[:-1]) + " or " + known[-1] if known else "none"
            raise self.error(f"unknown {self.noun} {name!r}", f"use {choices}")
        return self._classes[key]
