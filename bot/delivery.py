"""Job events into Discord: one status message per job, edited as the job moves, then the clip.

The bot consumes the job event stream (:func:`worker.events.consume`) with :class:`DiscordDelivery`:

- progress events edit the job's status message, at most once per ``status_edit_interval`` per job
  (a busy server must not run into Discord's rate limits); a burst of events is coalesced into one
  edit showing the latest state;
- the result replaces the status message with the clip, its caption and the buttons, through the
  member's interaction token while it lives (15 minutes); after that the bot posts it in the channel
  with its own token, as a reply to the request, with the event id as the message nonce so a retry
  after a crash cannot post it twice;
- a clip larger than the upload limit is encoded smaller to fit, or, when it cannot fit, linked to
  the web endpoint (``ANIMABOT_PUBLIC_URL``).

Events of jobs no Discord member asked for (the CLI's) are passed over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from sqlmodel import Session

from bot import texts
from bot.buttons import result_view
from worker import encode, links
from worker.events import JobEvent
from worker.models import Delivery, utcnow

if TYPE_CHECKING:
    from bot.discord_bot import AnimaBot

log = logging.getLogger(__name__)

KEY_PREFIX = "discord:"
#: Stop using a reply token this long before Discord's 15 minutes are up.
TOKEN_MARGIN = timedelta(seconds=60)


def nonce(event_id: int) -> str:
    """The message nonce for an event: the same event always gets the same one (at most 25 chars)."""
    return f"anim{event_id}"[:25]


class DiscordDelivery:
    """The Discord front end's handler for job events."""

    def __init__(self, bot: AnimaBot) -> None:
        self.bot = bot
        self._last_edit: dict[int, float] = {}
        self._pending: dict[int, str] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._retry_notes: dict[int, str] = {}  # job -> the last retry's line, shown until the job ends

    async def __call__(self, event: JobEvent) -> None:
        """Show ``event`` in Discord; raising leaves it pending for another try."""
        if not str(event.payload.get("key") or "").startswith(KEY_PREFIX):
            return
        delivery = await asyncio.to_thread(self._delivery, event.job_id)
        if delivery is None:
            return
        self._cancel_pending(event.job_id)
        text = self._status_text(event)
        if not event.final:
            self._edit_soon(delivery, text)
            return
        if event.kind == "succeeded":
            await self._post_result(event, delivery)
        else:
            await self._edit_status(delivery, text)
        self._last_edit.pop(event.job_id, None)  # the job is over: nothing more to throttle

    def _status_text(self, event: JobEvent) -> str:
        """The status line; after a retry, every later status keeps the reason under it until the end.

        Edits are coalesced, so "that one came out frozen, trying again" would often be replaced by
        "generating (attempt 2 of 4)" or "smoothing…" before anyone saw it.
        """
        line = texts.status_line(event)
        if event.final:
            self._retry_notes.pop(event.job_id, None)
            return line
        if event.kind == "retrying":
            self._retry_notes[event.job_id] = line
            return line
        note = self._retry_notes.get(event.job_id)
        return f"{line}\n{note}" if note else line

    # -- status message ------------------------------------------------------------------------

    def _edit_soon(self, delivery: Delivery, text: str) -> None:
        """Edit now if the last edit was long enough ago, else once the interval is over."""
        job_id, interval = delivery.job_id, self.bot.settings.status_edit_interval
        wait = self._last_edit.get(job_id, 0.0) + interval - time.monotonic()
        self._pending[job_id] = text
        if wait <= 0:
            self._spawn(self._flush(delivery))
        elif job_id not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[job_id] = loop.call_later(wait, lambda: self._spawn(self._flush(delivery)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(lambda t: t.cancelled() or (t.exception() and log.warning(
            "status edit failed: %s", t.exception())))

    async def _flush(self, delivery: Delivery) -> None:
        self._timers.pop(delivery.job_id, None)
        text = self._pending.pop(delivery.job_id, None)
        if text is not None:
            await self._edit_status(delivery, text)

    def _cancel_pending(self, job_id: int) -> None:
        timer = self._timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()
        self._pending.pop(job_id, None)

    async def _edit_status(self, delivery: Delivery, text: str, **fields: Any) -> None:
        self._last_edit[delivery.job_id] = time.monotonic()
        if delivery.status_message_id is None:
            return
        message_id = int(delivery.status_message_id)
        if self._token_alive(delivery):
            try:
                await self._webhook(delivery).edit_message(message_id, content=text, **fields)
                return
            except discord.HTTPException as exc:
                await self._token_died(delivery, exc)
        if not delivery.private:  # an ephemeral reply cannot be edited without its token
            channel = self.bot.get_partial_messageable(int(delivery.channel_id))
            try:
                await channel.get_partial_message(message_id).edit(content=text, **fields)
            except (discord.Forbidden, discord.NotFound) as exc:  # deleted, or no rights: progress is not vital
                log.info("job %s: status not updated: %s", delivery.job_id, exc)

    # -- the result ----------------------------------------------------------------------------

    async def _post_result(self, event: JobEvent, delivery: Delivery) -> None:
        clip = event.payload["clip"]
        path, link = await self._fit(Path(clip["path"]), clip, delivery.upload_limit)
        caption = texts.result_caption(event.payload, user_id=delivery.user_id, link=link)
        view = result_view(event.job_id)
        files = [discord.File(path, filename="animation.mp4")] if path else []
        message_id = None
        if self._token_alive(delivery) and delivery.status_message_id:
            try:
                message = await self._webhook(delivery).edit_message(
                    int(delivery.status_message_id), content=caption, attachments=files, view=view,
                )
                message_id = message.id
            except discord.HTTPException as exc:
                await self._token_died(delivery, exc)
                files = [discord.File(path, filename="animation.mp4")] if path else []  # the first was consumed
        if message_id is None:
            channel = self.bot.get_partial_messageable(int(delivery.channel_id))
            reference = None
            if delivery.status_message_id and not delivery.private:
                reference = discord.MessageReference(
                    message_id=int(delivery.status_message_id), channel_id=int(delivery.channel_id),
                    fail_if_not_exists=False,
                )
            try:
                message = await channel.send(caption, files=files, view=view, nonce=nonce(event.id),
                                             reference=reference)  # type: ignore[arg-type]
            except discord.Forbidden as exc:
                # Retrying cannot help until an admin fixes the channel's permissions: say so loudly.
                log.error("job %s: cannot post its clip in channel %s (%s); the bot needs View Channel, Send "
                          "Messages and Attach Files there", event.job_id, delivery.channel_id, exc.text)
                return
            message_id = message.id
            if delivery.status_message_id and not delivery.private:
                await self._edit_status(delivery, "✅ done — the clip is below")
        await asyncio.to_thread(self._record, delivery.job_id, result_message_id=str(message_id))

    async def _fit(self, path: Path, clip: dict[str, Any], limit: int) -> tuple[Path | None, str | None]:
        """The file to attach under ``limit`` bytes (re-encoded if needed), or a link when none fits."""
        if clip["bytes"] <= limit:
            return path, None
        smaller = path.with_name(f"{path.stem}-fit{limit}.mp4")
        try:
            if not smaller.exists():
                await asyncio.to_thread(encode.fit_to_limit, path, smaller, limit_bytes=limit)
            if smaller.stat().st_size <= limit:
                return smaller, None
        except Exception as exc:  # too small a limit for any watchable encode
            log.info("clip %s does not fit %d bytes: %s", clip["id"], limit, exc)
        settings = self.bot.settings
        if settings.public_url:
            return None, settings.public_url.rstrip("/") + links.clip_path(settings.webhook_key(), int(clip["id"]))
        return None, "(set ANIMABOT_PUBLIC_URL so the bot can link clips too big for Discord)"

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _token_died(self, delivery: Delivery, exc: discord.HTTPException) -> None:
        """The reply token was refused (expired early, or revoked): carry on with the bot's own token."""
        if exc.status not in (401, 404) and exc.code not in (50027, 10015):
            raise exc
        log.info("job %s: reply token refused (%s %s); posting with the bot token", delivery.job_id, exc.status,
                 exc.code)
        delivery.reply_token = ""
        await asyncio.to_thread(self._record, delivery.job_id, reply_token="")

    def _token_alive(self, delivery: Delivery) -> bool:
        expires = delivery.token_expires_at
        if not delivery.reply_token or expires is None:
            return False
        expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
        return utcnow() < expires - TOKEN_MARGIN

    def _webhook(self, delivery: Delivery) -> discord.Webhook:
        return discord.Webhook.partial(int(delivery.application_id), delivery.reply_token, client=self.bot)

    def _delivery(self, job_id: int) -> Delivery | None:
        with Session(self.bot.db, expire_on_commit=False) as session:
            return session.get(Delivery, job_id)

    def _record(self, job_id: int, **fields: Any) -> None:
        with Session(self.bot.db) as session:
            row = session.get(Delivery, job_id)
            if row is not None:
                for name, value in fields.items():
                    setattr(row, name, value)
                session.add(row)
                session.commit()


def token_expiry(created_at: datetime) -> datetime:
    """When an interaction's token stops working: 15 minutes after the interaction."""
    created = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
    return created + timedelta(minutes=15)
