"""What a job costs in credits, from a price table kept in a TOML file rather than in code.

Admins change prices by pointing ``ANIMABOT_PRICES_FILE`` at their own table; without one the built-in
``worker/data/prices.toml`` applies. A price is ``base + per_second * duration`` rounded up to a whole
credit, per backend, with optional per-model overrides::

    >>> price("fake", None, 5.0)
    5
    >>> price("local", None, 5.0)
    0

Two more kinds of entry:

- a model's ``with_end_frame`` table prices its clips that end on a given picture, where the provider
  charges more for them (Kling on Replicate switches to its "pro" mode); ``price(..., end_frame=True)``;
- a text-to-image model (the still a prompt-only job starts from) is priced as a clip of 0 seconds: its
  ``base``, :func:`still_price`.

Arithmetic is decimal, so 1.1 credits/s for 10 s is 11, not 12. A backend missing from the table raises
:class:`UnknownPrice`; a malformed table raises :class:`PriceTableError` when it is loaded.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from worker.settings import get_settings

__all__ = ["BUILTIN_PRICES", "PriceTable", "PriceTableError", "Rate", "UnknownPrice", "load_prices", "price",
           "still_price"]

#: The price table used when ``settings.prices_file`` is empty.
BUILTIN_PRICES = Path(str(resources.files("worker") / "data" / "prices.toml"))

_RATE_KEYS = {"base", "per_second"}


class PriceTableError(ValueError):
    """The price table is malformed (unknown key, negative or non-numeric price, bad TOML)."""


class UnknownPrice(LookupError):
    """The price table has no entry for this backend."""


@dataclass(frozen=True)
class Rate:
    """A price: ``base`` credits per job plus ``per_second`` credits per second of clip."""

    base: Decimal = Decimal(0)
    per_second: Decimal = Decimal(0)

    def cost(self, duration: float) -> int:
        """Credits for a clip of ``duration`` seconds, rounded up."""
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(f"a duration is a finite number of seconds ≥ 0, not {duration!r}")
        return math.ceil(self.base + self.per_second * Decimal(repr(float(duration))))


@dataclass(frozen=True)
class PriceTable:
    """Rates per backend and per (backend, model), as read from a price file."""

    backends: Mapping[str, Rate]
    models: Mapping[tuple[str, str], Rate] = field(default_factory=dict)
    source: str = "<memory>"
    end_frame_models: Mapping[tuple[str, str], Rate] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        """Read and check a TOML price file."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PriceTableError(f"cannot read price table {path}: {exc}") from exc
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, source: str = "<memory>") -> PriceTable:
        """Build a table from parsed TOML: ``{"backends": {name: {base, per_second, models}}}``."""
        unknown = set(data) - {"backends"}
        backends = data.get("backends")
        if unknown or not isinstance(backends, dict) or not backends:
            raise PriceTableError(f"{source}: expected only [backends.<name>] tables, got {sorted(data)}")
        rates: dict[str, Rate] = {}
        models: dict[tuple[str, str], Rate] = {}
        end_frame: dict[tuple[str, str], Rate] = {}
        for name, entry in backends.items():
            where = f"{source}: [backends.{name}]"
            entry = dict(_table(entry, where))
            model_entries = _table(entry.pop("models", {}), f"{where}.models")
            rates[name] = _rate(entry, Rate(), where)
            for model, override in model_entries.items():
                model_where = f'{where}.models."{model}"'
                override = dict(_table(override, model_where))
                with_end = override.pop("with_end_frame", None)
                models[(name, model)] = _rate(override, rates[name], model_where)
                if with_end is not None:
                    end_where = f"{model_where}.with_end_frame"
                    end_frame[(name, model)] = _rate(_table(with_end, end_where), models[(name, model)], end_where)
        return cls(backends=rates, models=models, source=source, end_frame_models=end_frame)

    def rate(self, backend: str, model: str | None = None, *, end_frame: bool = False) -> Rate:
        """The rate of ``model`` on ``backend`` (ending on a given frame); the backend's own for an unlisted model."""
        if backend not in self.backends:
            listed = ", ".join(sorted(self.backends))
            raise UnknownPrice(f"no price for backend {backend!r} in {self.source}; it lists {listed}")
        if model is not None and end_frame and (backend, model) in self.end_frame_models:
            return self.end_frame_models[(backend, model)]
        if model is not None and (backend, model) in self.models:
            return self.models[(backend, model)]
        return self.backends[backend]

    def price(self, backend: str, model: str | None, duration: float, *, end_frame: bool = False) -> int:
        """Credits for a ``duration``-second clip from ``model`` on ``backend``, rounded up."""
        return self.rate(backend, model, end_frame=end_frame).cost(duration)


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PriceTableError(f"{where} must be a table, not {value!r}")
    return value


def _rate(entry: Mapping[str, Any], inherited: Rate, where: str) -> Rate:
    unknown = set(entry) - _RATE_KEYS
    if unknown:
        raise PriceTableError(f"{where}: unknown keys {sorted(unknown)}; a rate has base and per_second")
    values = {}
    for key in _RATE_KEYS:
        value = entry.get(key, getattr(inherited, key))
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise PriceTableError(f"{where}: {key} must be a number, not {value!r}")
        if not math.isfinite(value) or value < 0:
            raise PriceTableError(f"{where}: {key} must be a finite number ≥ 0, not {value!r}")
        values[key] = value if isinstance(value, Decimal) else Decimal(repr(value))
    return Rate(**values)


@lru_cache(maxsize=8)
def load_prices(path: Path | None = None) -> PriceTable:
    """The price table at ``path`` (the built-in one for None), read once per process."""
    return PriceTable.load(path or BUILTIN_PRICES)


def price(
    backend: str,
    model: str | None,
    duration: float,
    *,
    table: PriceTable | None = None,
    overrides: Mapping[str, Any] | None = None,
    end_frame: bool = False,
) -> int:
    """Credits a ``duration``-second clip costs on ``backend`` (and ``model``), rounded up.

    ``overrides`` are a server's own per-second prices by backend (``/animabot price``), which win
    over the table. ``end_frame``: the clip ends on a given picture (a model's ``with_end_frame``
    price, where it has one). Uses ``table``, else the file named by ``settings.prices_file``, else the
    built-in table. Raises :class:`UnknownPrice` for a backend the table does not list.
    """
    if overrides and backend in overrides:
        return Rate(per_second=Decimal(str(overrides[backend]))).cost(duration)
    if table is None:
        table = load_prices(get_settings().prices_file)
    return table.price(backend, model, duration, end_frame=end_frame)


def still_price(backend: str, model: str | None, *, table: PriceTable | None = None) -> int:
    """Credits for one still painted by text-to-image ``model`` on ``backend``: its rate's ``base``.

    A server's per-second overrides do not apply (a still has no seconds). Raises :class:`UnknownPrice`
    for a backend the table does not list.
    """
    if table is None:
        table = load_prices(get_settings().prices_file)
    return table.price(backend, model, 0.0)
