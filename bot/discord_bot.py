"""The Discord bot: one ``commands.Bot`` that owns the slash commands, the buttons and the deliveries.

``animabot run`` starts it when ``ANIMABOT_DISCORD_TOKEN`` is set, next to the job system (embedded)
or in front of the Celery workers (scale-out). Commands are synced to Discord only when they changed
since the last sync (a hash kept in the data folder): to ``ANIMABOT_DISCORD_DEV_GUILD`` instantly while
developing, globally otherwise. Buttons are :class:`~bot.buttons.JobButton` dynamic items, so those of
messages posted before a restart keep working.

Tests and emulators point discord.py elsewhere with ``DISCORD_API_BASE`` and ``DISCORD_GATEWAY_URL``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import discord
import yarl
from discord.ext import commands
from sqlalchemy import Engine
from sqlmodel import Session

from bot.actions import Actions
from bot.buttons import JobButton
from bot.commands import COMMANDS
from bot.delivery import DiscordDelivery
from bot.gallery import Gallery
from worker import ledger
from worker.models import GuildSettings
from worker.runner import JobControl, Kick
from worker.settings import Settings

log = logging.getLogger(__name__)

#: What the bot needs in a channel: see it, post in it, attach clips, add the gallery's ⭐ and read
#: the history it replies to.
PERMISSIONS = discord.Permissions(view_channel=True, send_messages=True, attach_files=True, embed_links=True,
                                  add_reactions=True, read_message_history=True)


def point_discord_py_at_env() -> None:
    """Send discord.py's REST and gateway traffic to ``DISCORD_API_BASE`` / ``DISCORD_GATEWAY_URL`` if set."""
    if base := os.environ.get("DISCORD_API_BASE"):
        discord.http.Route.BASE = base.rstrip("/")
    if gateway := os.environ.get("DISCORD_GATEWAY_URL"):
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


def invite_url(application_id: int) -> str:
    """The link an owner opens to add the bot to a server, with exactly the permissions it needs."""
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS,
                                   scopes=("bot", "applications.commands"))


class AnimaBot(commands.Bot):
    """animabot's Discord front end."""

    def __init__(self, db: Engine, settings: Settings, worker: JobControl, kick: Kick, **options: object) -> None:
        intents = discord.Intents.default()  # interactions need no privileged intent
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, help_command=None,
                         **options)  # type: ignore[arg-type]
        self.db, self.settings, self.worker, self.kick = db, settings, worker, kick
        self.actions = Actions(self)
        self.gallery = Gallery(self)
        self.delivery = DiscordDelivery(self)

    async def setup_hook(self) -> None:
        """Register commands and buttons, and sync the commands if they changed."""
        for command in COMMANDS:
            self.tree.add_command(command)
        self.add_dynamic_items(JobButton)
        await self.sync_commands()

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync the slash commands when their definition changed; True if it synced."""
        guild = discord.Object(int(self.settings.discord_dev_guild)) if self.settings.discord_dev_guild else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        payload = [c.to_dict(self.tree) for c in self.tree.get_commands(guild=guild)]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        marker = self.settings.data_dir / f"discord-commands-{guild.id if guild else 'global'}.sha256"
        if not force and marker.exists() and marker.read_text().strip() == digest:
            return False
        await self.tree.sync(guild=guild)
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest)
        log.info("synced %d commands %s", len(payload), f"to guild {guild.id}" if guild else "globally")
        return True

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """⭐ in the gallery channel: a vote."""
        await self.gallery.on_reaction(payload)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        """⭐ taken back: the vote too."""
        await self.gallery.on_reaction(payload)

    def account_id(self, interaction: discord.Interaction) -> int:
        """The ledger account of the member behind ``interaction``, in its server."""
        with Session(self.db) as session:
            account = ledger.member_account(session, str(interaction.guild_id), str(interaction.user.id))
            return account.id or 0

    def gallery_channel_id(self, guild_id: int | None) -> str | None:
        """The server's gallery channel, if it chose one."""
        with Session(self.db) as session:
            guild = session.get(GuildSettings, str(guild_id))
            return guild.gallery_channel_id if guild else None
