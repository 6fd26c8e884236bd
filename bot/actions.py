"""What the bot does for a member: start a job for an interaction, and the buttons' actions.

Every interaction is acknowledged first (Discord allows 3 seconds and nothing slow happens before
the acknowledgement), then the work runs: downloads, database, the job system. Refusals are
ephemeral: only the member sees what was wrong and what would work, and nothing is charged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import discord
from sqlmodel import Session, select

from backends.base import CameraMove
from bot import texts
from bot.delivery import KEY_PREFIX, token_expiry
from worker.errors import UserError
from worker.jobs import JobParams
from worker.models import Attempt, Clip, Delivery, GuildSettings, Job
from worker.runner import CancelRefused
from worker.submit import submit

if TYPE_CHECKING:
    from bot.discord_bot import AnimaBot

log = logging.getLogger(__name__)

EXTEND_SECONDS = 5.0


class Refusal(Exception):
    """The member asked for something that cannot be done; the message says what would work."""


async def defer(interaction: discord.Interaction, *, ephemeral: bool) -> None:
    """Acknowledge with a "thinking…" reply, remembering the reply's id (it becomes the job's status message)."""
    callback = await interaction.response.defer(thinking=True, ephemeral=ephemeral)
    if callback is not None and callback.message_id is not None:
        interaction.extras["reply_id"] = callback.message_id


async def refuse(interaction: discord.Interaction, message: str) -> None:
    """Tell only this member ``message``: replaces a public "thinking…" with an ephemeral note."""
    text = f"⚠️ {message}"
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    original = await interaction.original_response()
    if original.flags.ephemeral:
        await interaction.edit_original_response(content=text)
        return
    await interaction.delete_original_response()
    await interaction.followup.send(text, ephemeral=True)


class Actions:
    """Starting jobs and answering buttons, for one bot."""

    def __init__(self, bot: AnimaBot) -> None:
        self.bot = bot

    # -- starting a job ------------------------------------------------------------------------

    async def download(self, attachment: discord.Attachment, *, what: str = "picture") -> bytes:
        """The attachment's bytes, from Discord's CDN only and never more than the upload cap.

        ``what`` names it in refusals (the picture, the end frame).
        """
        settings = self.bot.settings
        host = urlsplit(attachment.url).hostname or ""
        if host not in settings.discord_cdn_hosts:
            raise Refusal(f"that attachment is not on Discord's CDN ({host}); upload the {what} to Discord")
        if attachment.size > settings.max_upload_bytes:
            mib = settings.max_upload_bytes / 2**20
            raise Refusal(f"the {what} is {attachment.size / 2**20:.1f} MiB and the limit is {mib:g} MiB; "
                          "send a smaller export (a JPEG at quality 90 is usually a few MiB)")
        data = await attachment.read()
        if len(data) > settings.max_upload_bytes:
            raise Refusal(f"the {what} is larger than it said; send a smaller export")
        return data

    async def start(
        self,
        interaction: discord.Interaction,
        params: JobParams,
        image: bytes | None,
        *,
        private: bool = False,
        parent_job_id: int | None = None,
        extends: int | None = None,
        end_image: bytes | None = None,
    ) -> None:
        """Submit a job for this (already acknowledged) interaction; its status message is the reply.

        ``image=None`` submits a prompt-only job (its picture is painted first); ``end_image`` is a picture
        the clip should end on.
        """
        assert interaction.guild_id is not None and interaction.channel_id is not None
        # The deferral said which message is the reply; asking Discord again costs a round trip per job.
        reply_id = interaction.extras.get("reply_id") or (await interaction.original_response()).id
        delivery = Delivery(
            job_id=0, user_id=str(interaction.user.id), channel_id=str(interaction.channel_id),
            application_id=str(interaction.application_id), reply_token=interaction.token,
            token_expires_at=token_expiry(interaction.created_at),
            upload_limit=interaction.filesize_limit, private=private, status_message_id=str(reply_id),
        )
        try:
            await asyncio.to_thread(
                submit, self.bot.db, self.bot.settings, image=image, params=params,
                member=(str(interaction.guild_id), str(interaction.user.id)), key=f"{KEY_PREFIX}{interaction.id}",
                channel_id=str(interaction.channel_id), parent_job_id=parent_job_id, extends=extends,
                delivery=delivery, kick=self.bot.kick, end_image=end_image,
            )
        except UserError as exc:
            await refuse(interaction, exc.message)

    async def check_channel(self, interaction: discord.Interaction) -> None:
        """Refuse if this server allows animations only in other channels."""
        guild = await asyncio.to_thread(self._guild_settings, interaction.guild_id)
        allowed = guild.allowed_channel_ids if guild else []
        if allowed and str(interaction.channel_id) not in allowed:
            where = ", ".join(f"<#{c}>" for c in allowed)
            raise Refusal(f"animations are made in {where} on this server; try there")

    def _guild_settings(self, guild_id: int | None) -> GuildSettings | None:
        if guild_id is None:
            return None
        with Session(self.bot.db) as session:
            return session.get(GuildSettings, str(guild_id))

    # -- buttons -------------------------------------------------------------------------------

    async def run(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        """Answer a click on one of a job's buttons."""
        public = action in ("retry", "extend", "vary")  # a new job: its status message is public
        await defer(interaction, ephemeral=not public)
        try:
            job, clip = await asyncio.to_thread(self._job_and_clip, job_id)
            if job is None:
                raise Refusal(f"job {job_id} no longer exists")
            await getattr(self, f"_{action}")(interaction, job, clip)
        except Refusal as exc:
            await refuse(interaction, str(exc))
        except CancelRefused as exc:
            await refuse(interaction, str(exc))

    def _job_and_clip(self, job_id: int) -> tuple[Job | None, Clip | None]:
        with Session(self.bot.db, expire_on_commit=False) as session:
            return session.get(Job, job_id), session.exec(select(Clip).where(Clip.job_id == job_id)).first()

    def _params(self, job: Job, **changes: object) -> JobParams:
        base = JobParams(prompt=job.prompt, camera=CameraMove(job.camera), motion=job.motion, duration=job.duration,
                         aspect=job.aspect, seed=None, negative=job.negative_prompt, backend=job.requested_backend,
                         model=job.model)
        return replace(base, **changes)  # type: ignore[arg-type]

    async def _source(self, job: Job) -> bytes | None:
        """The job's picture (a prompt-only job's painted one), or None for one whose picture was never painted."""
        if not job.source_path and "paint" in (job.detail or {}):
            return None  # painting it failed: the new job paints again
        path = Path(job.source_path or "")
        if not path.is_file():
            raise Refusal("the picture of that job is gone; start again with /animate")
        return await asyncio.to_thread(path.read_bytes)

    async def _end_frame(self, job: Job) -> bytes | None:
        """The end frame the job was given, if any."""
        end = (job.detail or {}).get("end_frame")
        if not end:
            return None
        path = Path(end["path"])
        if not path.is_file():
            raise Refusal("the end frame of that job is gone; start again with /animate")
        return await asyncio.to_thread(path.read_bytes)

    async def _retry(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        await self.start(interaction, self._params(job), await self._source(job), parent_job_id=job.id,
                         end_image=await self._end_frame(job))

    async def _vary(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        moves = [m for m in CameraMove if m.value != job.camera and m is not CameraMove.STATIC]
        params = self._params(job, camera=random.choice(moves))
        await self.start(interaction, params, await self._source(job), parent_job_id=job.id,
                         end_image=await self._end_frame(job))

    async def _extend(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        if clip is None or clip.deleted:
            raise Refusal("that clip is not finished or was deleted; extend a finished clip")
        await self.start(interaction, self._params(job, duration=EXTEND_SECONDS), b"", extends=job.id)

    async def _info(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        attempts, lineage = await asyncio.to_thread(self._history, job)
        await interaction.edit_original_response(content=texts.details(job, attempts, lineage)[:2000])

    def _history(self, job: Job) -> tuple[list[Attempt], list[int]]:
        with Session(self.bot.db) as session:
            attempts = list(session.exec(select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)))
            lineage, parent = [], job.parent_job_id
            while parent is not None and len(lineage) < 20:
                lineage.append(parent)
                row = session.get(Job, parent)
                parent = row.parent_job_id if row else None
        return attempts, lineage

    def _owner(self, interaction: discord.Interaction, job: Job) -> bool:
        with Session(self.bot.db) as session:
            delivery = session.get(Delivery, job.id)
        return delivery is not None and delivery.user_id == str(interaction.user.id)

    async def _publish(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        if clip is None or clip.deleted:
            raise Refusal("there is no clip to publish")
        if not await asyncio.to_thread(self._owner, interaction, job):
            raise Refusal("only the member who made this clip can publish it")
        await self.bot.gallery.publish(interaction, job, clip)

    async def _delete(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        moderator = interaction.permissions.manage_messages
        if not moderator and not await asyncio.to_thread(self._owner, interaction, job):
            raise Refusal("only the member who made this clip or a moderator can delete it")
        await self.bot.gallery.delete(job, clip)
        await interaction.edit_original_response(content="🗑️ deleted")

    async def _cancel(self, interaction: discord.Interaction, job: Job, clip: Clip | None) -> None:
        account = await asyncio.to_thread(self.bot.account_id, interaction)
        now = await self.bot.worker.cancel(job.id or 0, account_id=account)
        await interaction.edit_original_response(
            content=f"🛑 job {job.id} canceled" if now else f"🛑 job {job.id} stops when its current step ends")
