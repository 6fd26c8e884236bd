"""The slash commands: ``/animate``, ``/credits``, ``/jobs``, ``/gallery`` and the admins' ``/animabot``.

``/animate`` takes a picture, or only a prompt when a text-to-image model is configured (the picture is
painted first; without one the member is told it needs a picture), and optionally an ``end_frame``
picture the clip should end on (refused by name where no model here can).

Every handler acknowledges first (Discord's 3 seconds) unless it can answer at once, and checks rights
itself: Discord's default permissions are only a hint to the client, not a security boundary.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from sqlmodel import Session, select

from backends.base import CameraMove
from backends.registry import backend_classes
from bot import texts
from bot.actions import Refusal, defer, refuse
from bot.buttons import cancel_view
from worker import ledger, pricing, scheduler, stills
from worker.errors import UserError
from worker.jobs import ASPECTS, JobParams
from worker.models import FINAL_STATES, GuildSettings, Job
from worker.routing import load_routes

if TYPE_CHECKING:
    from bot.discord_bot import AnimaBot

CAMERAS = [app_commands.Choice(name=c.value, value=c.value) for c in CameraMove]
ASPECT_CHOICES = [app_commands.Choice(name=a, value=a) for a in ASPECTS]


def _bot(interaction: discord.Interaction) -> AnimaBot:
    return interaction.client  # type: ignore[return-value]


@app_commands.command(name="animate", description="Make a picture move")
@app_commands.describe(
    image="The picture to animate (JPEG, PNG, WebP…); leave it out to have one painted from the prompt",
    end_frame="A picture the clip should end on (only some models can)",
    prompt="The motion you want, e.g. 'gentle waves, slow push-in'",
    camera="Camera move", motion="Motion strength, 0 (subtle) to 4 (strong)", duration="Length in seconds",
    aspect="Shape of the clip (auto follows the picture)", model="Which model makes it (prices shown)",
    seed="Same seed, same picture and prompt: the same clip", negative="What to avoid",
    private="Only you see the clip",
)
@app_commands.choices(camera=CAMERAS, aspect=ASPECT_CHOICES)
@app_commands.guild_only()
async def animate(
    interaction: discord.Interaction,
    prompt: app_commands.Range[str, 1, 1000],
    image: discord.Attachment | None = None,
    end_frame: discord.Attachment | None = None,
    camera: app_commands.Choice[str] | None = None,
    motion: app_commands.Range[int, 0, 4] | None = None,
    duration: app_commands.Range[float, 1.0, 60.0] | None = None,
    aspect: app_commands.Choice[str] | None = None,
    model: str | None = None,
    seed: app_commands.Range[int, 0, 2**31 - 1] | None = None,
    negative: str | None = None,
    private: bool = False,
) -> None:
    """Submit an animation job (prompt-only: painted first); the reply becomes its status message, then the clip."""
    bot = _bot(interaction)
    settings = bot.settings
    backend, _, model_id = (model or "").partition(":")
    try:  # checks that need no I/O happen before the acknowledgement, and answer at once
        params = JobParams(
            prompt=prompt, camera=CameraMove(camera.value) if camera else CameraMove.ZOOM_IN,
            motion=settings.default_motion if motion is None else motion,
            duration=settings.default_duration if duration is None else duration,
            aspect=aspect.value if aspect else "auto", seed=seed, negative=negative or "",
            backend=backend or None, model=model_id or None,
        ).checked()
        if image is None:
            stills.require_painter(settings)  # says what to configure when nothing can paint one
    except UserError as exc:
        await refuse(interaction, exc.message)
        return
    await defer(interaction, ephemeral=private)
    try:
        await bot.actions.check_channel(interaction)
        data = await bot.actions.download(image) if image is not None else None
        ending = await bot.actions.download(end_frame, what="end frame") if end_frame is not None else None
    except Refusal as exc:
        await refuse(interaction, str(exc))
        return
    await bot.actions.start(interaction, params, data, private=private, end_image=ending)


@animate.autocomplete("model")
async def _model_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    bot = _bot(interaction)
    duration = bot.settings.default_duration
    choices = []
    for name, cls in backend_classes().items():
        if not cls.check_usable(bot.settings).usable:
            continue
        models = sorted({s.model for steps in load_routes().values() for s in steps if s.backend == name and s.model})
        for model in [None, *models]:
            try:
                credits = pricing.price(name, model, duration)
            except pricing.UnknownPrice:
                continue
            value = f"{name}:{model}" if model else name
            label = f"{value} — {'free' if not credits else f'{credits} credits for {duration:g} s'}"
            if current.lower() in value.lower():
                choices.append(app_commands.Choice(name=label[:100], value=value[:100]))
    return choices[:25]


@app_commands.command(name="credits", description="Your credits, today's free ones and recent charges")
@app_commands.guild_only()
async def credits_command(interaction: discord.Interaction) -> None:
    """Balance, held credits, the daily grant and the last charges and refunds (only you see it)."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    bot = _bot(interaction)

    def read() -> str:
        with Session(bot.db) as session:
            account = ledger.member_account(session, str(interaction.guild_id), str(interaction.user.id))
            guild = session.get(GuildSettings, str(interaction.guild_id))
            daily = guild.daily_grant if guild and guild.daily_grant is not None else bot.settings.daily_free_credits
            ledger.daily_grant(session, account.id or 0, daily)
            balance = ledger.balance(session, account.id or 0)
            recent = ledger.history(session, account.id or 0)
            return texts.credits_summary(balance.available, balance.held, daily, recent)

    await interaction.edit_original_response(content=await asyncio.to_thread(read))


@app_commands.command(name="jobs", description="Your animations in progress, with cancel buttons")
@app_commands.guild_only()
async def jobs_command(interaction: discord.Interaction) -> None:
    """Unfinished jobs with their queue position and estimate."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    bot = _bot(interaction)

    def read() -> tuple[str, list[int]]:
        account = bot.account_id(interaction)
        with Session(bot.db) as session:
            rows = session.exec(select(Job).where(
                Job.account_id == account, Job.state.not_in([s.value for s in FINAL_STATES]),  # type: ignore[attr-defined]
            ).order_by(Job.id)).all()
        lines = []
        for job in rows:
            position, eta = scheduler.position(bot.db, bot.settings, job.id or 0)
            where = f"position {position}" if position else job.state
            lines.append(f"job {job.id}: {where}, {texts.eta(eta)} — {job.prompt[:60]}")
        return "\n".join(lines) or "you have no animations in progress", [j.id or 0 for j in rows]

    text, ids = await asyncio.to_thread(read)
    await interaction.edit_original_response(content=text, view=cancel_view(ids) if ids else None)


@app_commands.command(name="gallery", description="This server's top and latest published clips")
@app_commands.guild_only()
async def gallery_command(interaction: discord.Interaction) -> None:
    """Links to the top clips by ⭐ votes and the latest ones."""
    await interaction.response.defer(thinking=True)
    bot = _bot(interaction)
    top, recent = await asyncio.to_thread(bot.gallery.listing, str(interaction.guild_id))

    def line(clip: Any, delivery: Any) -> str:
        where = ""
        if delivery and (delivery.gallery_message_id or delivery.result_message_id):
            message = delivery.gallery_message_id or delivery.result_message_id
            channel = delivery.channel_id
            if delivery.gallery_message_id:
                channel = bot.gallery_channel_id(interaction.guild_id)
            where = f" https://discord.com/channels/{interaction.guild_id}/{channel}/{message}"
        return f"⭐ {clip.votes} · {clip.prompt[:60]}{where}"

    if not top:
        await interaction.edit_original_response(content="no published clips yet: press ⭐ under one of yours")
        return
    text = "**top**\n" + "\n".join(line(*r) for r in top) + "\n**latest**\n" + "\n".join(line(*r) for r in recent)
    await interaction.edit_original_response(content=text[:2000])


# -- admins --------------------------------------------------------------------------------------


admin = app_commands.Group(
    name="animabot", description="Server settings for animabot (Manage Server)", guild_only=True,
    default_permissions=discord.Permissions(manage_guild=True),
)


async def _admin_only(interaction: discord.Interaction) -> bool:
    """Rights are checked here, not only by Discord's defaults, which a server can change."""
    if interaction.permissions.manage_guild:
        return True
    await refuse(interaction, "only members with Manage Server can change animabot's settings")
    return False


async def _update_guild(interaction: discord.Interaction, message: str, **fields: Any) -> None:
    bot = _bot(interaction)

    def write() -> None:
        with Session(bot.db) as session:
            guild = session.get(GuildSettings, str(interaction.guild_id)) or GuildSettings(
                guild_id=str(interaction.guild_id))
            for name, value in fields.items():
                setattr(guild, name, value)
            session.add(guild)
            session.commit()

    await asyncio.to_thread(write)
    await interaction.response.send_message(f"✅ {message}", ephemeral=True)


def _guild(interaction: discord.Interaction) -> GuildSettings:
    with Session(_bot(interaction).db) as session:
        guild_id = str(interaction.guild_id)
        return session.get(GuildSettings, guild_id) or GuildSettings(guild_id=guild_id)


@admin.command(name="grant", description="Give a member credits")
async def grant(
    interaction: discord.Interaction, member: discord.Member, amount: app_commands.Range[int, 1, 100000]
) -> None:
    """Grant credits, once per interaction (a retried command grants nothing more)."""
    if not await _admin_only(interaction):
        return
    bot = _bot(interaction)

    def write() -> int:
        with Session(bot.db) as session:
            account = ledger.member_account(session, str(interaction.guild_id), str(member.id))
            ledger.grant(session, account.id or 0, amount, key=f"discord:{interaction.id}",
                         memo=f"by {interaction.user.id}")
            return ledger.balance(session, account.id or 0).available

    balance = await asyncio.to_thread(write)
    await interaction.response.send_message(f"✅ {member.mention} got {amount} credits (now {balance})",
                                            ephemeral=True)


@admin.command(name="price", description="Set this server's price per second of clip for a backend")
async def price(
    interaction: discord.Interaction, backend: str, credits_per_second: app_commands.Range[float, 0, 1000]
) -> None:
    """A server's own price, over the built-in table."""
    if not await _admin_only(interaction):
        return
    if backend not in backend_classes():
        await refuse(interaction, f"there is no backend {backend!r}; installed: {', '.join(backend_classes())}")
        return
    prices = {**_guild(interaction).prices, backend: credits_per_second}
    await _update_guild(interaction, f"{backend} costs {credits_per_second:g} credits per second here", prices=prices)


@admin.command(name="daily", description="Set the free credits each member gets per day")
async def daily(interaction: discord.Interaction, credits: app_commands.Range[int, 0, 100000]) -> None:
    """The daily grant of this server."""
    if await _admin_only(interaction):
        await _update_guild(interaction, f"members get {credits} free credits a day", daily_grant=credits)


@admin.command(name="gallery", description="Choose the channel published clips are posted in")
async def gallery_channel(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
    """Where ⭐-published clips go."""
    if await _admin_only(interaction):
        await _update_guild(interaction, f"published clips go to {channel.mention}", gallery_channel_id=str(channel.id))


@admin.command(name="channels", description="Allow /animate only in this channel (again to remove it; 'clear' for all)")
@app_commands.describe(clear="Allow every channel again")
async def channels(interaction: discord.Interaction, channel: discord.TextChannel | None = None,
                   clear: bool = False) -> None:
    """Toggle a channel in the allowed list, or clear the list."""
    if not await _admin_only(interaction):
        return
    allowed = [] if clear else list(_guild(interaction).allowed_channel_ids)
    if channel is not None and not clear:
        picked = str(channel.id)
        allowed = [c for c in allowed if c != picked] if picked in allowed else [*allowed, picked]
    where = ", ".join(f"<#{c}>" for c in allowed) or "every channel"
    await _update_guild(interaction, f"/animate works in {where}", allowed_channel_ids=allowed)


@admin.command(name="route", description="Send pictures of a subject to a backend (and model) first")
@app_commands.choices(subject=[app_commands.Choice(name=s, value=s) for s in
                               ("portrait", "landscape", "product", "text", "other")])
async def route(interaction: discord.Interaction, subject: app_commands.Choice[str], backend: str,
                model: str | None = None) -> None:
    """A routing override: this backend first for this subject, then the built-in route."""
    if not await _admin_only(interaction):
        return
    if backend not in backend_classes():
        await refuse(interaction, f"there is no backend {backend!r}; installed: {', '.join(backend_classes())}")
        return
    entry = {"backend": backend, **({"model": model} if model else {}), "reason": "chosen by this server's admins"}
    table = load_routes().get(subject.value, ())
    builtin = [{"backend": s.backend, "model": s.model, "reason": s.reason} for s in table]
    overrides = {**_guild(interaction).routing_overrides, subject.value: [entry, *builtin]}
    await _update_guild(interaction, f"{subject.value} pictures go to {backend} first", routing_overrides=overrides)


@admin.command(name="limits", description="Unfinished jobs per member, and the pause between two submits")
async def limits(interaction: discord.Interaction, per_member: app_commands.Range[int, 1, 100] | None = None,
                 cooldown_seconds: app_commands.Range[int, 0, 86400] | None = None) -> None:
    """Per-member cap and cooldown of this server."""
    if not await _admin_only(interaction):
        return
    fields: dict[str, Any] = {}
    if per_member is not None:
        fields["max_concurrent_per_user"] = per_member
    if cooldown_seconds is not None:
        fields["cooldown_seconds"] = cooldown_seconds
    guild = _guild(interaction)
    cap = fields.get("max_concurrent_per_user", guild.max_concurrent_per_user)
    pause = fields.get("cooldown_seconds", guild.cooldown_seconds)
    await _update_guild(interaction, f"members may run {cap or 'the default number of'} jobs at once, "
                                     f"{pause or 0} s apart", **fields)


COMMANDS = (animate, credits_command, jobs_command, gallery_command, admin)
