"""The server's gallery: published clips cross-posted to its gallery channel, ⭐ reactions as votes.

A member publishes their own clip with its ⭐ button; the clip is then listed by ``/gallery`` and, when
the server has a gallery channel (``/animabot gallery``), posted there with a ⭐ reaction to start the
voting. Each ⭐ a member adds there is a vote for the clip, and removing it takes the vote back (the
bot's own ⭐ does not count).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import discord
import sqlalchemy as sa
from sqlmodel import Session, select

from worker.models import Clip, Delivery, GuildSettings, Job

if TYPE_CHECKING:
    from bot.discord_bot import AnimaBot

log = logging.getLogger(__name__)

STAR = "⭐"


class Gallery:
    """Publishing, deleting and voting on clips."""

    def __init__(self, bot: AnimaBot) -> None:
        self.bot = bot

    async def publish(self, interaction: discord.Interaction, job: Job, clip: Clip) -> None:
        """List the clip in ``/gallery`` and cross-post it to the gallery channel, if the server has one."""
        channel_id, delivery = await asyncio.to_thread(self._publish_row, clip.id or 0, job)
        where = "in /gallery"
        if channel_id and delivery is not None and delivery.gallery_message_id is None:
            channel = self.bot.get_partial_messageable(int(channel_id))
            caption = f"⭐ by <@{delivery.user_id}>\n> {job.prompt[:300]}"
            file = discord.File(clip.path, filename="animation.mp4") if clip.bytes <= delivery.upload_limit else None
            message = await channel.send(caption, file=file) if file else await channel.send(caption)  # type: ignore[arg-type]
            await asyncio.to_thread(self._set_gallery_message, job.id or 0, str(message.id))
            await message.add_reaction(STAR)  # after the id is stored, so the first votes are counted
            where = f"in <#{channel_id}> and /gallery"
        await interaction.edit_original_response(content=f"⭐ published {where}")

    def _publish_row(self, clip_id: int, job: Job) -> tuple[str | None, Delivery | None]:
        with Session(self.bot.db, expire_on_commit=False) as session:
            session.execute(sa.update(Clip).where(Clip.id == clip_id).values(published=True))
            session.commit()
            guild = session.get(GuildSettings, job.guild_id or "")
            return (guild.gallery_channel_id if guild else None), session.get(Delivery, job.id)

    def _set_gallery_message(self, job_id: int, message_id: str) -> None:
        with Session(self.bot.db) as session:
            session.execute(sa.update(Delivery).where(Delivery.job_id == job_id).values(gallery_message_id=message_id))
            session.commit()

    async def delete(self, job: Job, clip: Clip | None) -> None:
        """Remove the clip's messages and its file; it leaves the gallery."""
        delivery = await asyncio.to_thread(self._delete_rows, job, clip)
        if delivery is None:
            return
        channel = self.bot.get_partial_messageable(int(delivery.channel_id))
        for message_id in (delivery.result_message_id, delivery.status_message_id):
            if message_id:
                with contextlib.suppress(discord.NotFound):
                    await channel.get_partial_message(int(message_id)).delete()
                break
        gallery = await asyncio.to_thread(self._gallery_channel, job.guild_id)
        if gallery and delivery.gallery_message_id:
            with contextlib.suppress(discord.NotFound):
                await self.bot.get_partial_messageable(int(gallery)).get_partial_message(
                    int(delivery.gallery_message_id)).delete()

    def _delete_rows(self, job: Job, clip: Clip | None) -> Delivery | None:
        with Session(self.bot.db, expire_on_commit=False) as session:
            if clip is not None:
                session.execute(sa.update(Clip).where(Clip.id == clip.id).values(deleted=True, published=False))
                session.commit()
                Path(clip.path).unlink(missing_ok=True)
            return session.get(Delivery, job.id)

    def _gallery_channel(self, guild_id: str | None) -> str | None:
        with Session(self.bot.db) as session:
            guild = session.get(GuildSettings, guild_id or "")
            return guild.gallery_channel_id if guild else None

    async def on_reaction(self, payload: discord.RawReactionActionEvent) -> None:
        """A ⭐ added or removed in the gallery channel: recount that clip's votes."""
        if str(payload.emoji) != STAR or payload.user_id == (self.bot.user.id if self.bot.user else None):
            return
        delta = 1 if payload.event_type == "REACTION_ADD" else -1
        await asyncio.to_thread(self._vote, str(payload.message_id), delta)

    def _vote(self, message_id: str, delta: int) -> None:
        with Session(self.bot.db) as session:
            delivery = session.exec(select(Delivery).where(Delivery.gallery_message_id == message_id)).first()
            if delivery is None:
                return
            session.execute(
                sa.update(Clip).where(Clip.job_id == delivery.job_id)
                .values(votes=sa.func.max(Clip.votes + delta, 0) if session.bind.dialect.name == "sqlite"  # type: ignore[union-attr]
                        else sa.func.greatest(Clip.votes + delta, 0))
            )
            session.commit()

    def listing(self, guild_id: str, *, limit: int = 5) -> tuple[list[tuple[Clip, Delivery | None]], ...]:
        """The server's top clips by votes and its most recent ones, each with where it was posted."""
        with Session(self.bot.db) as session:
            base = select(Clip).where(Clip.guild_id == guild_id, Clip.published, sa.not_(Clip.deleted))
            top = session.exec(base.order_by(Clip.votes.desc(), Clip.id.desc()).limit(limit)).all()  # type: ignore[attr-defined]
            recent = session.exec(base.order_by(Clip.id.desc()).limit(limit)).all()  # type: ignore[union-attr]
            return tuple([(c, session.get(Delivery, c.job_id)) for c in rows] for rows in (top, recent))
