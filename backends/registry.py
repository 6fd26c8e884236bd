"""Finds backends: built-ins and third-party packages alike, through the ``animabot.backends`` entry points.

A package adds a backend by declaring, in its ``pyproject.toml``::

    [project.entry-points."animabot.backends"]
    my-model = "my_package.backend:MyModelBackend"

The entry-point name must equal the class's ``name``. animabot's own backends are registered the same
way, so there is one path for every backend. A backend whose module fails to import (including one that
declares itself wrongly, see :class:`backends.base.BackendDeclarationError`) is reported by
:func:`load_failures` and listed as broken, rather than taking every other backend down with it.

Tests add a backend for the duration of a block with :func:`registered`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any

from backends.base import Backend

GROUP = "animabot.backends"

_classes: dict[str, type[Backend]] | None = None
_failures: dict[str, str] = {}


class UnknownBackend(LookupError):
    """No backend of that name is installed."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown backend {name!r}; installed: {', '.join(known) or 'none'}")
        self.name = name


def _load() -> dict[str, type[Backend]]:
    global _classes
    if _classes is None:
        classes: dict[str, type[Backend]] = {}
        _failures.clear()
        for ep in entry_points(group=GROUP):
            try:
                cls = ep.load()
            except Exception as exc:  # a broken plugin must not hide the others
                _failures[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                _failures[ep.name] = f"{ep.value} is not a Backend subclass"
            elif cls.name != ep.name:
                _failures[ep.name] = f"entry point name {ep.name!r} differs from the class name {cls.name!r}"
            elif cls.name in classes:
                _failures[ep.name] = f"two packages register a backend named {cls.name!r}"
            else:
                classes[cls.name] = cls
        _classes = classes
    return _classes


def backend_classes() -> dict[str, type[Backend]]:
    """Every installed backend class, by name, in name order."""
    return dict(sorted(_load().items()))


def load_failures() -> dict[str, str]:
    """Entry points that could not be loaded, with the reason."""
    _load()
    return dict(_failures)


def end_frame_models() -> list[str]:
    """Every installed model that can end a clip on a given picture, as refusals name them."""
    return [model for cls in backend_classes().values() for model in cls.end_frame_models()]


def get_backend_class(name: str) -> type[Backend]:
    """The backend class called ``name``; raise :class:`UnknownBackend` if none is installed."""
    classes = _load()
    try:
        return classes[name]
    except KeyError:
        raise UnknownBackend(name, sorted(classes)) from None


def create_backend(name: str, settings: Any, **options: Any) -> Backend:
    """An instance of backend ``name`` configured with ``settings`` (and backend-specific options)."""
    return get_backend_class(name)(settings, **options)


@contextmanager
def registered(cls: type[Backend]) -> Iterator[type[Backend]]:
    """Make ``cls`` available by its name inside the block (for tests and embedding)."""
    classes = _load()
    previous = classes.get(cls.name)
    classes[cls.name] = cls
    try:
        yield cls
    finally:
        if previous is None:
            classes.pop(cls.name, None)
        else:
            classes[cls.name] = previous
