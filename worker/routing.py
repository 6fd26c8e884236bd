"""Which backend gets which picture: the routing table, per-guild overrides and the user's own choice.

    route = plan_route("portrait", probe, settings)
    route.steps      # usable entries, best first: where the job goes, then where it falls back
    route.skipped    # entries passed over, each with the reason (recorded on the job)

Precedence: a backend the user names always wins (and is refused by name if it cannot do the job);
otherwise a guild's override for the subject; otherwise ``worker/data/routes.toml``. The ``local``
backend ends every route as the fallback of last resort. An entry is skipped when its backend is not
installed, not configured (missing settings), unhealthy, or cannot honour the requested camera,
duration or aspect. A duration longer than a backend allows is not a reason to skip it: the pipeline
builds such clips from segments, each continuing the last frame of the one before.

A clip that must end on a given picture (an end frame) can only go to a model that takes one: after the
subject's own entries (which are skipped, by name, if they cannot) the route tries the table's
``end-frame`` list, the models that can; ``local`` cannot, so such a job may find no route and is then
refused before it is charged.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from backends.base import Backend, GenerationRequest
from backends.registry import UnknownBackend, get_backend_class
from worker.errors import InvalidParameters

ROUTES_FILE = Path(__file__).parent / "data" / "routes.toml"
FALLBACK = "local"
#: The table's list of models that can end on a given frame; not a subject.
END_FRAME = "end-frame"


@dataclass(frozen=True)
class RouteStep:
    """One backend (and model) a subject may go to, and why."""

    backend: str
    model: str | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        """``backend`` or ``backend/model``."""
        return f"{self.backend}:{self.model}" if self.model else self.backend


@dataclass(frozen=True)
class Route:
    """The backends a job will try, in order, and the ones passed over with the reason."""

    subject: str
    origin: str
    steps: tuple[RouteStep, ...]
    skipped: tuple[tuple[RouteStep, str], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """For the job's record and ``animabot inspect``."""
        return {
            "subject": self.subject,
            "origin": self.origin,
            "steps": [{"backend": s.backend, "model": s.model, "reason": s.reason} for s in self.steps],
            "skipped": [{"backend": s.backend, "model": s.model, "why": why} for s, why in self.skipped],
        }


@lru_cache(maxsize=4)
def _load_table(path: Path) -> dict[str, tuple[RouteStep, ...]]:
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    return {subject: tuple(_step(entry, f"{path.name} [{subject}]") for entry in entries)
            for subject, entries in raw.items()}


def load_routes(path: Path = ROUTES_FILE) -> dict[str, tuple[RouteStep, ...]]:
    """The routing table: subject → ordered steps."""
    return {name: steps for name, steps in _load_table(path).items() if name != END_FRAME}


def end_frame_steps(path: Path = ROUTES_FILE) -> tuple[RouteStep, ...]:
    """The models a clip that must end on a given frame may go to, best first."""
    return _load_table(path).get(END_FRAME, ())


def _step(entry: Mapping[str, Any], where: str) -> RouteStep:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("backend"), str):
        raise ValueError(f"{where}: every entry needs a backend name")
    return RouteStep(backend=entry["backend"], model=entry.get("model"), reason=str(entry.get("reason", "")))


def plan_route(
    subject: str,
    probe: GenerationRequest,
    settings: Any,
    *,
    backend: str | None = None,
    model: str | None = None,
    guild_overrides: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    healthy: Callable[[str, str | None], str | None] | None = None,
    instances: Mapping[str, Backend] | None = None,
) -> Route:
    """The route for a picture of ``subject`` and a request shaped like ``probe``.

    ``healthy(backend, model)`` returns why a backend is unavailable (cooldown, outage) or None.
    Raises :class:`~worker.errors.InvalidParameters` when nothing on the route can do the job, naming
    what each candidate could not do.
    """
    if backend:
        origin, candidates = "user", [RouteStep(backend, model, "chosen by the user")]
    elif guild_overrides and subject in guild_overrides:
        origin = "guild"
        candidates = [_step(e, f"guild override [{subject}]") for e in guild_overrides[subject]]
    else:
        table = load_routes()
        origin, candidates = "table", list(table.get(subject) or table.get("other") or ())
    ending = probe.end_image_path is not None
    if ending and not backend:
        candidates += [s for s in end_frame_steps() if all(s.label != c.label for c in candidates)]
    if not backend and all(c.backend != FALLBACK for c in candidates):
        candidates.append(RouteStep(FALLBACK, None, "fallback of last resort"))

    steps: list[RouteStep] = []
    skipped: list[tuple[RouteStep, str]] = []
    for step in candidates:
        why = _why_not(step, probe, settings, healthy, instances or {})
        if why is None:
            steps.append(step)
        else:
            skipped.append((step, why))
    if not steps:
        problems = "; ".join(f"{s.label}: {why}" for s, why in skipped)
        if backend:
            raise InvalidParameters(f"backend {backend!r} cannot do this: {skipped[0][1]}")
        if ending:
            keys = sorted(set(re.findall(r"set (ANIMABOT_[A-Z0-9_]+)", problems)))
            how = f"set {' or '.join(keys)}" if keys else problems  # the owner's fix, not every model's reason
            raise InvalidParameters(
                "nothing here can end a clip on a given frame; leave out the end frame, or ask the bot's owner "
                f"to set up a model that can ({how})"
            )
        raise InvalidParameters(f"no backend can do this ({problems}); try another camera, duration or aspect")
    return Route(subject=subject, origin=origin, steps=tuple(steps), skipped=tuple(skipped))


def _why_not(
    step: RouteStep,
    probe: GenerationRequest,
    settings: Any,
    healthy: Callable[[str, str | None], str | None] | None,
    instances: Mapping[str, Backend],
) -> str | None:
    if step.backend in instances:
        cls: type[Backend] = type(instances[step.backend])
    else:
        try:
            cls = get_backend_class(step.backend)
        except UnknownBackend as exc:
            return str(exc)
    usable = cls.check_usable(settings)
    if not usable.usable:
        return f"not configured ({usable.reason})"
    if healthy is not None and (problem := healthy(step.backend, step.model)):
        return problem
    # Longer than the backend allows is fine: the pipeline extends the clip segment by segment, in lengths
    # the model makes.
    longest = max(cls.allowed_durations(step.model) or [cls.capabilities.durations[1]])
    segment = min(probe.duration, longest)
    refusals = cls.capabilities.refusals(replace(probe, model=step.model, duration=segment))
    return "; ".join(refusals) or None
