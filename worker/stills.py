"""The picture a prompt-only job starts from: which text-to-image model paints it, and what it costs.

``/animate`` without a picture (``animabot submit --prompt`` without one) is a two-stage job: a
text-to-image model paints a still from the prompt, then the still is animated exactly like an upload.
Which model paints is ``ANIMABOT_TEXT_TO_IMAGE``:

==============================================  ============================================================
``replicate:black-forest-labs/flux-schnell``    that model (its backend must be usable: its key set)
``fal``                                         that backend's first text-to-image model
(empty, the default)                            the first usable backend, in the order the routing table
                                                names them (replicate, then fal), that has one
``none``                                        prompt-only jobs are refused
==============================================  ============================================================

:func:`require_painter` returns the choice with its price in credits, or refuses the job with an
:class:`~worker.errors.InvalidParameters` that says what to configure; :func:`painter` answers None
instead. Nothing here talks to a provider: the pipeline's ``paint`` stage does (``Backend.imagine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.base import Aspect, Backend
from backends.registry import UnknownBackend, get_backend_class
from worker import pricing, routing
from worker.errors import InvalidParameters

#: Stills are painted at the clip's size, but never with a long side under this (models want detail).
MIN_LONG_SIDE = 512
#: Diffusion models take sizes in multiples of this.
SIZE_STEP = 16
OFF = "none"

NO_PAINTER = (
    "this bot has no text-to-image model, so an animation needs a picture: attach one (the bot's owner can "
    "enable prompt-only animations with ANIMABOT_REPLICATE_API_TOKEN or ANIMABOT_FAL_KEY, or choose the "
    "model with ANIMABOT_TEXT_TO_IMAGE)"
)


@dataclass(frozen=True)
class Painter:
    """The text-to-image model that paints prompt-only jobs, and its price per still in credits."""

    backend: str
    model: str
    credits: int

    @property
    def label(self) -> str:
        """``backend:model``."""
        return f"{self.backend}:{self.model}"

    def to_json(self) -> dict[str, Any]:
        """As saved on the job (``job.detail["paint"]``)."""
        return {"backend": self.backend, "model": self.model, "credits": self.credits}


def require_painter(settings: Any) -> Painter:
    """The painter ``settings`` choose, or :class:`InvalidParameters` saying what to configure."""
    choice = (settings.text_to_image or "").strip()
    if choice.lower() == OFF:
        raise InvalidParameters("prompt-only animations are turned off on this bot, so an animation needs a "
                                "picture: attach one")
    if choice:
        name, _, model = choice.partition(":")
        return _explicit(settings, name.strip(), model.strip() or None)
    for name in _auto_order():
        try:
            cls = get_backend_class(name)
        except UnknownBackend:
            continue
        if cls.image_models and cls.check_usable(settings).usable:
            return _priced(name, cls.image_models[0])
    raise InvalidParameters(NO_PAINTER)


def painter(settings: Any) -> Painter | None:
    """The painter ``settings`` choose, or None when prompt-only jobs cannot run here."""
    try:
        return require_painter(settings)
    except InvalidParameters:
        return None


def still_aspect(job_aspect: str) -> Aspect:
    """The shape to paint: the one asked for; ``auto`` (no picture to follow) is 16:9."""
    return Aspect.LANDSCAPE if job_aspect == "auto" else Aspect(job_aspect)


def still_size(aspect: Aspect, long_side: int) -> tuple[int, int]:
    """``(width, height)`` to paint at: the clip's size (at least ``MIN_LONG_SIDE``) in steps of 16."""
    width, height = aspect.size(max(long_side, MIN_LONG_SIDE))
    return (max(SIZE_STEP, round(width / SIZE_STEP) * SIZE_STEP),
            max(SIZE_STEP, round(height / SIZE_STEP) * SIZE_STEP))


def _explicit(settings: Any, name: str, model: str | None) -> Painter:
    where = f"ANIMABOT_TEXT_TO_IMAGE={settings.text_to_image}"
    try:
        cls: type[Backend] = get_backend_class(name)
    except UnknownBackend as exc:
        raise InvalidParameters(f"prompt-only animations are misconfigured ({where}: {exc}); attach a picture "
                                "meanwhile") from None
    if not cls.image_models:
        raise InvalidParameters(f"prompt-only animations are misconfigured ({where}: {name} cannot paint a "
                                "picture from text); attach a picture meanwhile")
    chosen = cls.image_model(model)
    if chosen is None:
        known = ", ".join(cls.image_models) or "none"
        raise InvalidParameters(f"prompt-only animations are misconfigured ({where}: {name} cannot paint "
                                f"{model!r}; its text-to-image models: {known}); attach a picture meanwhile")
    usable = cls.check_usable(settings)
    if not usable.usable:
        raise InvalidParameters(f"prompt-only animations need {name}, which is not configured here "
                                f"({usable.reason}); attach a picture meanwhile")
    return _priced(name, chosen)


def _priced(backend: str, model: str) -> Painter:
    try:
        return Painter(backend, model, pricing.still_price(backend, model))
    except pricing.UnknownPrice:
        raise InvalidParameters(f"the text-to-image model {backend}:{model} has no price, so it cannot be "
                                "charged; add it to the price table, or attach a picture") from None


def _auto_order() -> list[str]:
    """Backends in the order the routing table first names them (the operator's preference)."""
    steps = [s for entries in routing.load_routes().values() for s in entries]
    return list(dict.fromkeys(s.backend for s in steps))
