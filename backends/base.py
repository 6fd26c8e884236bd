"""The one protocol every image-to-video backend implements.

A backend turns a still image and a request into a video file. Remote models take from seconds to
minutes, so the protocol is split into four non-blocking calls and a job never waits on a backend::

    handle = await backend.submit(request)      # starts the work, returns at once
    report = await backend.status(handle)       # cheap; call it again later (or on a webhook)
    if report.state is State.SUCCEEDED:
        result = await backend.result(handle)   # the video file on local disk
    await backend.cancel(handle)                 # best effort, idempotent

A backend may also paint a still from text (:meth:`Backend.imagine`, advertised by a non-empty
``image_models``), the first stage of a prompt-only job: a still takes seconds, not minutes, so that call
waits for its picture (bounded by the backend) instead of handing out a handle::

    if backend.image_models:
        still = await backend.imagine(ImageRequest(prompt="a lighthouse at dusk", output_path=path))

A :class:`Handle` is plain JSON-able data, so a job can persist it and any process can resume it.
Backends know nothing of chat, jobs or credits: they receive settings and requests, and return files.

Errors form one tree; callers retry only the transient subtree::

    BackendError
    ├── TransientBackendError          worth retrying (same or another backend)
    │   ├── RateLimited                carries retry_after seconds
    │   ├── BackendUnavailable         outage, 5xx, lost work
    │   └── BackendTimeout
    └── PermanentBackendError          retrying the same request cannot help
        ├── InvalidRequest             the request is malformed for this backend
        ├── UnsupportedRequest         valid, but this backend cannot honour it (names what)
        └── ContentRefused             moderation refusal

A backend that declares itself wrongly (no name, capabilities of the wrong type, an empty camera list…)
fails when its class is defined, with a :class:`BackendDeclarationError` that says what is wrong.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar


class CameraMove(StrEnum):
    """The camera moves a user can ask for."""

    STATIC = "static"
    ZOOM_IN = "zoom-in"
    ZOOM_OUT = "zoom-out"
    PAN_LEFT = "pan-left"
    PAN_RIGHT = "pan-right"
    PAN_UP = "pan-up"
    PAN_DOWN = "pan-down"
    ORBIT_LEFT = "orbit-left"
    ORBIT_RIGHT = "orbit-right"
    DOLLY_IN = "dolly-in"


class Aspect(StrEnum):
    """Output aspect ratios (``auto`` is resolved to one of these before a backend sees it)."""

    LANDSCAPE = "16:9"
    PORTRAIT = "9:16"
    SQUARE = "1:1"
    CLASSIC = "4:3"
    CLASSIC_PORTRAIT = "3:4"

    @property
    def ratio(self) -> float:
        """Width divided by height."""
        w, h = self.value.split(":")
        return int(w) / int(h)

    def size(self, long_side: int) -> tuple[int, int]:
        """``(width, height)`` with the given long side, both even (H.264 4:2:0 needs it)."""
        r = self.ratio
        if r >= 1:
            w, h = long_side, long_side / r
        else:
            w, h = long_side * r, long_side
        return int(round(w / 2) * 2), int(round(h / 2) * 2)


class State(StrEnum):
    """Where a submitted generation stands."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """Whether the generation will not change state any more."""
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELED)


@dataclass(frozen=True)
class Box:
    """A rectangle in source-image pixels, e.g. a detected face."""

    x: float
    y: float
    width: float
    height: float

    @property
    def center(self) -> tuple[float, float]:
        """The centre point ``(x, y)``."""
        return self.x + self.width / 2, self.y + self.height / 2


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a backend needs to animate one image.

    ``image_path`` is a validated RGB image already fitted to ``width × height``'s aspect.
    ``end_image_path``, when set, is a second picture fitted the same way that the clip should end on;
    only some models can (``Capabilities.end_frame``, per model for catalogue backends), the others
    refuse the request by name.
    ``output_dir`` is where the backend writes its file; ``output_name`` is the file name to use there.
    ``key`` names this generation uniquely and stably (job and attempt), for providers that accept an
    idempotency key, so a retried submit never starts a second generation; ``attempt`` counts the job's
    attempts from 1. ``webhook_url``, when set, is where the provider should report this generation's
    progress (``POST``); the job system verifies those calls with :meth:`Backend.verify_webhook`.
    """

    image_path: Path
    prompt: str
    output_dir: Path
    output_name: str = "generated.mp4"
    negative_prompt: str = ""
    camera: CameraMove = CameraMove.ZOOM_IN
    motion: int = 2
    duration: float = 5.0
    aspect: Aspect = Aspect.LANDSCAPE
    width: int = 1280
    height: int = 720
    fps: int = 24
    seed: int = 0
    model: str | None = None
    focus: Box | None = None
    key: str = ""
    attempt: int = 1
    webhook_url: str = ""
    end_image_path: Path | None = None


@dataclass(frozen=True)
class ImageRequest:
    """Everything a backend needs to paint one still from text (:meth:`Backend.imagine`).

    ``width × height`` is the size wanted (models that take an aspect ratio instead get ``aspect`` and
    make their own size near it); ``output_path`` is where the picture is written, as PNG. ``model``
    names one of the backend's ``image_models`` (the first when None). ``attempt`` counts the job's
    tries at painting from 1.
    """

    prompt: str
    output_path: Path
    negative_prompt: str = ""
    aspect: Aspect = Aspect.LANDSCAPE
    width: int = 1024
    height: int = 576
    seed: int = 0
    model: str | None = None
    attempt: int = 1


@dataclass(frozen=True)
class ImageResult:
    """A painted still: a PNG on local disk and what it cost the provider."""

    image_path: Path
    width: int
    height: int
    cost_usd: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Handle:
    """A reference to submitted work; JSON-able so a job can persist and resume it."""

    backend: str
    id: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain data for storage."""
        return {"backend": self.backend, "id": self.id, "data": self.data}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Handle:
        """Rebuild a handle stored with :meth:`to_json`."""
        return cls(backend=raw["backend"], id=raw["id"], data=dict(raw.get("data") or {}))


@dataclass(frozen=True)
class StatusReport:
    """What :meth:`Backend.status` says about a handle."""

    state: State
    progress: float | None = None
    queue_position: int | None = None
    message: str = ""
    error: BackendError | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation: a video file on local disk and what it cost the provider."""

    video_path: Path
    width: int
    height: int
    fps: float
    frames: int
    cost_usd: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.fps if self.fps else 0.0


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared on its class and checked when the class is defined.

    ``durations`` is the inclusive range of clip lengths in seconds; ``settings`` names the settings
    attributes that must be non-empty for the backend to be usable (e.g. ``"replicate_api_token"``).
    """

    cameras: frozenset[CameraMove]
    durations: tuple[float, float]
    aspects: frozenset[Aspect]
    fps: int
    good_at: frozenset[str] = frozenset()
    cost_per_second_usd: float = 0.0
    needs_network: bool = False
    settings: tuple[str, ...] = ()
    min_short_side: int = 256
    max_long_side: int = 1920
    end_frame: bool = False

    def problems(self) -> list[str]:
        """Reasons this declaration is wrong (empty when it is fine)."""
        out: list[str] = []
        if not self.cameras or not all(isinstance(c, CameraMove) for c in self.cameras):
            out.append("cameras must be a non-empty set of CameraMove")
        if not self.aspects or not all(isinstance(a, Aspect) for a in self.aspects):
            out.append("aspects must be a non-empty set of Aspect")
        lo, hi = self.durations
        if not 0 < lo <= hi:
            out.append(f"durations must be (min, max) with 0 < min <= max, got {self.durations!r}")
        if not 1 <= self.fps <= 120:
            out.append(f"fps must be 1..120, got {self.fps!r}")
        if self.cost_per_second_usd < 0:
            out.append("cost_per_second_usd must not be negative")
        if not 16 <= self.min_short_side <= self.max_long_side:
            out.append("need 16 <= min_short_side <= max_long_side")
        return out

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why this backend cannot honour ``request``, each reason naming the value and what would work."""
        out: list[str] = []
        if request.camera not in self.cameras:
            allowed = ", ".join(sorted(c.value for c in self.cameras))
            out.append(f"camera {request.camera.value!r} is not supported (supported: {allowed})")
        lo, hi = self.durations
        if not lo <= request.duration <= hi:
            out.append(f"duration {request.duration:g}s is outside {lo:g}..{hi:g}s")
        if request.aspect not in self.aspects:
            allowed = ", ".join(sorted(a.value for a in self.aspects))
            out.append(f"aspect {request.aspect.value} is not supported (supported: {allowed})")
        if request.end_image_path is not None and not self.end_frame:
            out.append("an end frame is not supported (it cannot end on a given picture)")
        return out


@dataclass(frozen=True)
class Usability:
    """Whether a backend can be used with the current settings, and why not."""

    usable: bool
    reason: str = ""


@dataclass(frozen=True)
class WebhookNotice:
    """What a verified provider webhook says about one generation.

    ``request_id`` is the provider's id of the generation (the :class:`Handle`'s ``id``). ``report`` is
    its state when the webhook itself is to be trusted for it (a backend that cannot be polled learns
    only this way); None means "it changed: poll it". ``data`` is merged into the handle's ``data``
    (e.g. the output a non-pollable provider delivered in the webhook, for :meth:`Backend.result`).
    """

    request_id: str
    report: StatusReport | None = None
    data: dict[str, Any] = field(default_factory=dict)


class WebhookRejected(Exception):
    """A webhook call that must not be acted on; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BackendDeclarationError(TypeError):
    """A backend class declares its name or capabilities wrongly."""


class BackendError(Exception):
    """Base of every error a backend raises; ``code`` is a stable machine-readable name."""

    code = "backend_error"
    transient = False

    def __init__(self, message: str, *, backend: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend

    def to_json(self) -> dict[str, Any]:
        """The error as JSON, so a job can record it and act on it after a restart."""
        raw: dict[str, Any] = {
            "type": type(self).__name__, "code": self.code, "transient": self.transient,
            "message": self.message, "backend": self.backend,
        }
        if isinstance(self, RateLimited):
            raw["retry_after"] = self.retry_after
        return raw

    @staticmethod
    def from_json(raw: dict[str, Any]) -> BackendError:
        """The error :meth:`to_json` recorded; a plugin's own error type comes back as its nearest kind."""
        kinds = {cls.__name__: cls for cls in _error_classes()}
        cls = kinds.get(raw.get("type", "")) or (BackendUnavailable if raw.get("transient") else PermanentBackendError)
        message, backend = str(raw.get("message", "")), str(raw.get("backend", ""))
        if cls is RateLimited:
            return RateLimited(message, backend=backend, retry_after=float(raw.get("retry_after", 1.0)))
        return cls(message, backend=backend)


class TransientBackendError(BackendError):
    """Worth retrying: the same request may succeed later or elsewhere."""

    code = "transient"
    transient = True


class RateLimited(TransientBackendError):
    """The provider asked us to slow down for ``retry_after`` seconds."""

    code = "rate_limited"

    def __init__(self, message: str, *, backend: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message, backend=backend)
        self.retry_after = retry_after


class BackendUnavailable(TransientBackendError):
    """Outage, server error or work lost (e.g. the process that held it restarted)."""

    code = "unavailable"


class BackendTimeout(TransientBackendError):
    """The generation did not finish in time."""

    code = "timeout"


class PermanentBackendError(BackendError):
    """Retrying the same request with this backend cannot help."""

    code = "permanent"


class InvalidRequest(PermanentBackendError):
    """The request is malformed for this backend."""

    code = "invalid_request"


class UnsupportedRequest(PermanentBackendError):
    """The request is valid but this backend cannot honour it; the message names what."""

    code = "unsupported"


class ContentRefused(PermanentBackendError):
    """The provider's moderation refused the input or the prompt."""

    code = "content_refused"


def _error_classes() -> list[type[BackendError]]:
    found, todo = [], [BackendError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


_NAME = re.compile(r"^[a-z][a-z0-9_-]{1,31}$")


class Backend(ABC):
    """Base class of image-to-video backends.

    Subclasses set ``name``, ``description`` and ``capabilities`` and implement the four async calls.
    The constructor receives the settings object (any object with the attributes named in
    ``capabilities.settings``); backends never import the job system.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: Whether :meth:`status` asks the provider; one that cannot be polled (a Cog server) learns how a
    #: generation went only from its webhooks, and the job system only enforces its deadline.
    pollable: ClassVar[bool] = True
    #: The text-to-image models :meth:`imagine` can run, the default first; empty: it cannot paint.
    image_models: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):  # an intermediate base class, checked in its subclasses
            return
        problems: list[str] = []
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"name must be a lowercase slug like 'my-backend', got {name!r}")
        if not isinstance(cls.__dict__.get("description", getattr(cls, "description", None)), str):
            problems.append("description must be a string")
        caps = getattr(cls, "capabilities", None)
        if not isinstance(caps, Capabilities):
            problems.append(f"capabilities must be a Capabilities instance, got {type(caps).__name__}")
        else:
            problems.extend(caps.problems())
        images = getattr(cls, "image_models", ())
        if not isinstance(images, tuple) or not all(isinstance(m, str) and m for m in images):
            problems.append(f"image_models must be a tuple of model names, got {images!r}")
        if problems:
            raise BackendDeclarationError(
                f"backend class {cls.__module__}.{cls.__qualname__} is declared wrongly: "
                + "; ".join(problems)
            )

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @classmethod
    def check_usable(cls, settings: Any) -> Usability:
        """Whether this backend can run with ``settings``; override to add checks (e.g. health)."""
        missing = [s for s in cls.capabilities.settings if not getattr(settings, s, None)]
        if missing:
            names = ", ".join("ANIMABOT_" + s.upper() for s in missing)
            return Usability(False, f"set {names}")
        return Usability(True)

    def refusals(self, request: GenerationRequest) -> list[str]:
        """Why this backend cannot honour ``request`` (empty when it can)."""
        return self.capabilities.refusals(request)

    @classmethod
    def allowed_durations(cls, model: str | None) -> list[float]:
        """The only clip lengths ``model`` makes (e.g. 5 and 10 s); ``[]`` when any length will do.

        "Any length" means any within ``capabilities.durations``. The job system builds longer clips
        from segments of these lengths.
        """
        return []

    @classmethod
    def end_frame_models(cls) -> list[str]:
        """The models (``backend:model``, or the backend's name) that can end a clip on a given picture.

        What refusals name as the alternatives; empty for a backend that has none to offer.
        """
        return []

    @classmethod
    def image_model(cls, model: str | None) -> str | None:
        """The text-to-image model ``model`` names (the default for None or ""), or None if there is none."""
        if not cls.image_models:
            return None
        if not model:
            return cls.image_models[0]
        return model if model in cls.image_models else None

    async def imagine(self, request: ImageRequest) -> ImageResult:
        """Paint a still from ``request.prompt`` into ``request.output_path`` and wait for it.

        Raises the same error tree as the clip calls (transient errors are worth retrying). The default
        refuses: a backend that paints sets ``image_models`` and overrides this.
        """
        raise UnsupportedRequest(f"{self.name} cannot paint a picture from text", backend=self.name)

    @abstractmethod
    async def submit(self, request: GenerationRequest) -> Handle:
        """Start generating and return at once with a handle."""

    @abstractmethod
    async def status(self, handle: Handle) -> StatusReport:
        """Where the work behind ``handle`` stands; cheap enough to poll."""

    @abstractmethod
    async def result(self, handle: Handle) -> GenerationResult:
        """The finished video file; only valid once :meth:`status` says ``SUCCEEDED``."""

    @abstractmethod
    async def cancel(self, handle: Handle) -> None:
        """Stop the work behind ``handle`` if it still runs; idempotent."""

    async def recover(self, request: GenerationRequest, *, since: float, known: Collection[str] = ()) -> Handle | None:
        """The generation a lost submit of ``request`` started, if the provider has one; else None.

        A submit whose answer never arrived (a timeout, a dropped connection, the worker dying before it
        recorded the handle) may still have started a billed generation. Before submitting again the
        job system asks here; ``since`` (epoch seconds) is when the lost submit began, ``known`` the
        provider ids it already holds (never the lost one). The default finds nothing: right for backends
        whose submit is idempotent (Cog's ``PUT`` with our key) or that cannot list what they run.
        """
        return None

    async def verify_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookNotice:
        """Check a webhook call from the provider (signature, age, replay) and say what it is about.

        ``headers`` are the request's (case-insensitive mapping), ``body`` its raw bytes. Raise
        :class:`WebhookRejected` (401 bad signature, 408/401 stale timestamp, 409 replay, 400 malformed)
        for anything that must not be acted on. The default refuses: such a backend is polled.
        """
        raise WebhookRejected(404, f"{self.name} does not send webhooks")

    async def aclose(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources (connections, threads); the default does nothing."""
