"""One name -> default-object registry per kind of option object (solvers, backward passes)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Builds the default object of a registered name; passes objects through.

    Args:
        kind: what the objects are, for messages ("solver", "backward").
        base: their base class; an instance of it is returned unchanged.
        plural: how the message names the known ones ("solvers").
    """

    def __init__(self, kind: str, base: type, *, plural: str):
        self.kind, self.base, self.plural = kind, base, plural
        self._factories: dict[str, Callable[[], T]] = {}

    def register(self, name: str, factory: Callable[[], T] | None = None):
        """Decorator: ``name`` builds ``factory()`` (default: the decorated class)."""

        def deco(obj):
            if isinstance(obj, type):
                obj.name = name
            self._factories[name] = factory or obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, spec: "T | str") -> T:
        """The object for ``spec``, an instance or a registered name.

        Raises:
            ValueError: unknown name (the message lists the known ones).
            TypeError: neither a name nor an instance of the base class.
        """
        if isinstance(spec, self.base):
            return spec
        if isinstance(spec, str):
            if spec not in self._factories:
                raise ValueError(f"unknown {self.kind} {spec!r}; known {self.plural}: {', '.join(self.names())}")
            return self._factories[spec]()
        raise TypeError(f"{self.kind} must be a {self.base.__name__} or one of {self.names()}, "
                        f"got {type(spec).__name__}")
