"""Submitting a job: the one call a front end makes, and everything it must settle at once.

    receipt = submit(db, settings, image=data, params=JobParams(prompt="gentle waves"),
                     member=("guild-1", "user-7"), key=str(interaction.id), channel_id="42")
    receipt.job_id, receipt.position, receipt.eta_seconds

In order: the idempotency key (the same key returns the same job, charged once), the parameters, the
picture's header (type, size, pixel count; the pixels are decoded later by a worker), the price, then
one transaction that writes the job, checks the member's limits (unfinished jobs per member and per
server, cooldown) and reserves the credits. Refusals are :class:`~worker.errors.UserError` with a
message that says what is wrong and what would work; a refused submit writes nothing and costs
nothing. Last, the job system is told a job is ready (``kick``).

Two optional inputs change what is checked and what it costs:

- ``image=None``: a prompt-only job. A text-to-image model (:mod:`worker.stills`) paints the picture
  first; the job is refused, saying what to configure, when none is available, and its price adds the
  still's to the clip's. The painter chosen is kept on the job (``detail["paint"]``).
- ``end_image``: a picture the clip must end on, checked like the start picture and kept on the job
  (``detail["end_frame"]``). Only some models can; the job must have a route to one (or the backend
  the member named must be one), else it is refused by name here, before anything is charged.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, select

from backends.base import Aspect, GenerationRequest
from backends.registry import UnknownBackend, get_backend_class
from worker import imaging, ledger, postprocess, pricing, routing, scheduler, stills
from worker.errors import ImageRejected, InvalidParameters, LimitReached
from worker.jobs import JobParams, create_or_find_job
from worker.models import FINAL_STATES, Account, Clip, Delivery, GuildSettings, Job, utcnow
from worker.settings import Settings

Kick = Callable[[int], None]

_FINAL = [state.value for state in FINAL_STATES]


@dataclass(frozen=True)
class Receipt:
    """What a front end tells the member right away."""

    job_id: int
    position: int
    eta_seconds: float
    price_credits: int
    duplicate: bool = False

    def to_json(self) -> dict[str, Any]:
        """For ``animabot submit --json`` and front ends."""
        return {"job_id": self.job_id, "position": self.position, "eta_seconds": round(self.eta_seconds, 1),
                "price_credits": self.price_credits, "duplicate": self.duplicate}


def submit(
    db: Engine,
    settings: Settings,
    *,
    image: bytes | None,
    params: JobParams,
    member: tuple[str, str] | None = None,
    key: str | None = None,
    channel_id: str | None = None,
    parent_job_id: int | None = None,
    extends: int | None = None,
    delivery: Delivery | None = None,
    kick: Kick | None = None,
    end_image: bytes | None = None,
) -> Receipt:
    """Accept a job for ``member`` (guild id, user id), or refuse it with a :class:`~worker.errors.UserError`.

    ``member=None`` submits a free job on the operator's behalf (no credits, no limits). ``parent_job_id``
    records where a retry or variation came from. ``extends`` names a finished job whose clip this job
    continues: it starts on that clip's last frame (``image`` is ignored), and the finished clip is the
    old one followed by ``params.duration`` new seconds. ``delivery`` (a chat front end's record of
    where to answer) is written with the job, so the front end never sees an event it cannot place.
    ``image=None`` asks for a prompt-only job; ``end_image`` is a picture the clip must end on.
    """
    if key is not None and (existing := _by_key(db, key)) is not None:
        return _receipt(db, settings, existing, duplicate=True)
    detail: dict[str, Any] = {}
    if extends is not None:
        image, params, extension = _extension(db, settings, extends, params, member)
        detail.update(extension)
        parent_job_id = extends
    checked = params.checked()
    source = None
    if image is None:
        detail["paint"] = stills.require_painter(settings).to_json()
    else:
        fmt, _ = imaging.check_upload(image, settings)
        source = _store_upload(settings, image, fmt)
    if end_image is not None:
        detail["end_frame"] = {"path": str(_store_end_frame(settings, end_image))}
    guild_id = member[0] if member else None
    rules = _rules(db, settings, guild_id)
    account_id = _member_account(db, member, rules.daily_grant) if member else None
    price = quote(settings, checked, overrides=rules.prices, picture=image is not None,
                  end_frame=end_image is not None) if member else 0

    def admit(session: Session, job: Job) -> None:
        if account_id is not None:
            _admit(session, job, account_id, rules)
        if delivery is not None:
            assert job.id is not None
            session.add(Delivery(**{**delivery.model_dump(), "job_id": job.id}))

    job, created = create_or_find_job(
        db, checked, source_path=source, key=key, account_id=account_id, guild_id=guild_id,
        channel_id=channel_id, parent_job_id=parent_job_id, default_backend=settings.default_backend,
        price=price, admit=admit, detail=detail,
    )
    assert job.id is not None
    receipt = _receipt(db, settings, job, duplicate=not created)
    if not receipt.duplicate:
        scheduler.announce_queued(db, job.id, receipt.position, receipt.eta_seconds)
        if kick is not None:
            kick(1)
    return receipt


def _extension(
    db: Engine, settings: Settings, parent_id: int, params: JobParams, member: tuple[str, str] | None
) -> tuple[bytes, JobParams, dict[str, Any]]:
    """The picture, parameters and job detail of a job that continues job ``parent_id``'s clip."""
    with Session(db) as session:
        parent = session.get(Job, parent_id)
        clip = session.exec(select(Clip).where(Clip.job_id == parent_id)).first()
    if parent is None or clip is None or clip.deleted:
        raise InvalidParameters(f"job {parent_id} has no clip to extend; extend a finished clip")
    if member is not None and parent.guild_id != member[0]:
        raise InvalidParameters("that clip belongs to another server; extend clips made here")
    # The new part starts where the cross-fade will begin, so the fade joins like with like.
    fade = round(settings.stitch_overlap * settings.output_fps)
    frame = postprocess.last_frame(Path(clip.path), before=max(0, fade - 1))
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")
    aspect = parent.detail.get("plan", {}).get("aspect", parent.aspect)
    detail = {"extends_clip": clip.path, "extends_job": parent_id}
    return buf.getvalue(), replace(params, aspect=aspect), detail


def quote(
    settings: Settings, params: JobParams, *, overrides: dict[str, Any] | None = None, picture: bool = True,
    end_frame: bool = False,
) -> int:
    """Credits to reserve for ``params``.

    The requested model's price, or the dearest first choice of any route a picture could take: the
    subject is not known until a worker has looked at the picture, and the clip is charged at the
    price of the model that made it, never more than was reserved. ``picture=False`` (prompt-only) adds
    the still's price, or refuses when nothing can paint one; ``end_frame`` prices the clip ending on a
    given picture and refuses, by name, when no route (or not the backend named) can honour it.
    """
    still = 0 if picture else stills.require_painter(settings).credits
    probe = GenerationRequest(
        image_path=settings.media_path, prompt=params.prompt, output_dir=settings.media_path,
        camera=params.camera, motion=params.motion, duration=params.duration,
        aspect=Aspect.LANDSCAPE if params.aspect == "auto" else Aspect(params.aspect),
        end_image_path=settings.media_path if end_frame else None,
    )
    if params.backend:
        _backend_exists(params.backend)
        # A combination the chosen model cannot honour is refused now, by name, not after queueing.
        routing.plan_route("unknown", probe, settings, backend=params.backend, model=params.model)
        try:
            return still + pricing.price(params.backend, params.model, params.duration, overrides=overrides,
                                         end_frame=end_frame)
        except pricing.UnknownPrice:
            raise InvalidParameters(
                f"backend {params.backend!r} has no price, so it cannot be charged; add it to the price table"
            ) from None
    subjects = routing.load_routes()
    prices, refused = [], []
    for subject in subjects:
        try:
            first = routing.plan_route(subject, probe, settings).steps[0]
        except InvalidParameters as exc:
            refused.append(exc)
            continue
        try:
            prices.append(pricing.price(first.backend, first.model, params.duration, overrides=overrides,
                                        end_frame=end_frame))
        except pricing.UnknownPrice:
            continue
    if refused and len(refused) == len(subjects):
        raise refused[0]  # whatever the picture shows, nothing here can do it
    return still + max(prices, default=0)


def _backend_exists(name: str) -> None:
    try:
        get_backend_class(name)
    except UnknownBackend as exc:
        raise InvalidParameters(str(exc)) from None


@dataclass(frozen=True)
class _Rules:
    per_user: int
    per_guild: int
    cooldown: float
    daily_grant: int
    prices: dict[str, Any]


def _rules(db: Engine, settings: Settings, guild_id: str | None) -> _Rules:
    guild = None
    if guild_id:
        with Session(db) as session:
            guild = session.get(GuildSettings, guild_id)
    return _Rules(
        per_user=(guild.max_concurrent_per_user if guild and guild.max_concurrent_per_user
                  else settings.max_active_per_user),
        per_guild=settings.max_active_per_guild,
        cooldown=float(guild.cooldown_seconds if guild and guild.cooldown_seconds is not None
                       else settings.cooldown_seconds),
        daily_grant=guild.daily_grant if guild and guild.daily_grant is not None else settings.daily_free_credits,
        prices=dict(guild.prices) if guild and guild.prices else {},
    )


def _admit(session: Session, job: Job, account_id: int, rules: _Rules) -> None:
    """Refuse ``job`` if its member is over a limit; runs holding the member's row lock."""
    # A no-op write takes the member's row lock (PostgreSQL) or the write lock (SQLite): concurrent
    # submits by one member are counted one after another, never both under the limit.
    session.execute(sa.update(Account).where(Account.id == account_id).values(available=Account.available))
    mine = session.exec(
        select(Job.id, Job.created_at).where(Job.account_id == account_id, Job.id != job.id)
        .order_by(Job.id.desc())  # type: ignore[union-attr]
        .limit(1)
    ).first()
    active = session.scalar(
        sa.select(sa.func.count()).select_from(Job)
        .where(Job.account_id == account_id, Job.id != job.id, Job.state.not_in(_FINAL))  # type: ignore[attr-defined]
    )
    if active >= rules.per_user:
        raise LimitReached(
            f"you already have {active} animation{'s' if active != 1 else ''} in progress and the limit is "
            f"{rules.per_user}; wait for one to finish or cancel one (/jobs)"
        )
    if job.guild_id:
        # The server's row lock too (made if missing): members of one server submitting at once are
        # counted one after another against the server's limit. Always member first, then server.
        _lock_guild(session, job.guild_id)
        busy = session.scalar(
            sa.select(sa.func.count()).select_from(Job)
            .where(Job.guild_id == job.guild_id, Job.id != job.id, Job.state.not_in(_FINAL))  # type: ignore[attr-defined]
        )
        if busy >= rules.per_guild:
            raise LimitReached(
                f"this server already has {busy} animations in progress, its limit; try again in a few minutes"
            )
    if rules.cooldown and mine is not None:
        last = mine[1] if mine[1].tzinfo else mine[1].replace(tzinfo=utcnow().tzinfo)
        left = rules.cooldown - (utcnow() - last).total_seconds()
        if left > 0:
            raise LimitReached(f"please wait {left:.0f} s before your next animation (this server's cooldown)")


def _lock_guild(session: Session, guild_id: str) -> None:
    """Take the server's settings row lock, making the row first if the server has none yet."""
    row = {"guild_id": guild_id, "allowed_channel_ids": [], "routing_overrides": {}, "prices": {},
           "updated_at": utcnow()}
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(GuildSettings).values(**row).on_conflict_do_nothing())
    session.execute(sa.update(GuildSettings).where(GuildSettings.guild_id == guild_id)
                    .values(updated_at=GuildSettings.updated_at))


def _member_account(db: Engine, member: tuple[str, str], daily_grant: int) -> int:
    """The member's account, with today's free credits in it (granted once per UTC day)."""
    with Session(db) as session:
        account = ledger.member_account(session, *member)
        assert account.id is not None
        ledger.daily_grant(session, account.id, daily_grant)
        return account.id


def _store_end_frame(settings: Settings, data: bytes) -> Path:
    """Check the end frame's header like the start picture's, and keep it like an upload."""
    try:
        fmt, _ = imaging.check_upload(data, settings)
    except ImageRejected as exc:
        raise ImageRejected(f"the end frame cannot be used: {exc.message}", code=exc.code) from None
    return _store_upload(settings, data, fmt)


def _store_upload(settings: Settings, data: bytes, fmt: str) -> Any:
    """Keep the upload under its content hash (a resubmit of the same picture reuses the file)."""
    folder = settings.media_path / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{fmt.lower()}"
    if not path.exists():
        # A temporary file of its own: concurrent submits of one new picture must not write (and then
        # move away) each other's, which truncated the stored picture and failed the later submits.
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def _by_key(db: Engine, key: str) -> Job | None:
    with Session(db) as session:
        return session.exec(select(Job).where(Job.key == key)).first()


def _receipt(db: Engine, settings: Settings, job: Job, *, duplicate: bool) -> Receipt:
    assert job.id is not None
    position, eta = scheduler.position(db, settings, job.id)
    return Receipt(job.id, position, eta, job.price_credits, duplicate)
