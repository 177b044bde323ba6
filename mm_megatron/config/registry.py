"""A name -> object registry, the one mechanism behind every "select by config name" choice.

Projectors (``projector.type``), vision encoders (``vision.style``) and tiling schemes
(``model.tiling.type``) are each a :class:`Registry`: a module adds an entry with the
``register`` decorator, and code that selects by name calls ``lookup``, whose error names the
config field and lists what is registered. No ``if`` on a registered name anywhere else.

What it does not do: import the modules that register (each registry's home module does that),
or validate the entries beyond a type check.
"""

from __future__ import annotations

from collections.abc import Callable


class Registry[T](dict[str, T]):
    """``{name: entry}`` with a registering decorator and a lookup that explains itself.

    Args:
        field: The config field that selects an entry (``projector.type``), for messages.
        base: If given, entries must be subclasses of it.
    """

    def __init__(self, field: str, base: type | None = None):
        super().__init__()
        self.field = field
        self.base = base

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator adding its target under each of ``names`` (ValueError on a repeat)."""

        def deco(entry: T) -> T:
            if self.base is not None and not (
                isinstance(entry, type) and issubclass(entry, self.base)
            ):
                raise TypeError(f"{self.field} {names}: {entry!r} is not a {self.base.__name__}")
            for name in names:
                if name in self:
                    raise ValueError(f"{self.field} {name!r} registered twice")
                self[name] = entry
            return entry

        return deco

    def lookup(self, name: str) -> T:
        """The entry of ``name``; ValueError names the field and lists the registered names."""
        if name not in self:
            raise ValueError(f"{self.field}={name!r}; choose one of {sorted(self)}")
        return self[name]
