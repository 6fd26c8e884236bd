"""The Discord emulator against the real discord.py client: what Discord answers, the emulator answers."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Awaitable, Callable

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from emulators.discord_api import DiscordEmulator, Interaction, Permission, point_discord_py_at

FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42"
PNG = b"\x89PNG\r\n\x1a\n" + b"picture" * 10


class AgainButton(discord.ui.DynamicItem[discord.ui.Button], template=r"echo:again:(?P<job>[0-9]+)"):
    """A persistent button whose job id lives in its custom_id."""

    def __init__(self, job: int) -> None:
        super().__init__(
            discord.ui.Button(label="Again", style=discord.ButtonStyle.secondary, custom_id=f"echo:again:{job}")
        )
        self.job = job

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]) -> AgainButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.client.clicks.append((self.job, interaction.user.id))
        await interaction.response.send_message(f"again {self.job}", ephemeral=True)


Handler = Callable[["EchoBot", discord.Interaction, discord.Attachment, str], Awaitable[None]]


async def echo_as_video(bot: EchoBot, interaction: discord.Interaction, image: discord.Attachment, note: str) -> None:
    """Defer, read the picture from the CDN, answer with an MP4 and a retry button."""
    await interaction.response.defer(thinking=True)
    data = await image.read()
    view = discord.ui.View(timeout=None)
    view.add_item(AgainButton(job=7))
    video = discord.File(io.BytesIO(FAKE_MP4 + data), filename="result.mp4")
    await interaction.edit_original_response(content=f"Done: {note}", attachments=[video], view=view)


class EchoBot(commands.Bot):
    """A tiny bot: ``/echo image note`` whose body each test can swap (``bot.handler``)."""

    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned, intents=discord.Intents.default(), guild_ready_timeout=0.05
        )
        self.guild_id = guild_id
        self.handler: Handler = echo_as_video
        self.ready = asyncio.Event()
        self.errors: list[BaseException] = []
        self.clicks: list[tuple[int, int]] = []
        self.reactions: list[discord.RawReactionActionEvent] = []
        self.resumed = asyncio.Event()

        @app_commands.command(name="echo", description="Send the picture back as a video")
        async def echo(interaction: discord.Interaction, image: discord.Attachment, note: str = "") -> None:
            await self.handler(self, interaction, image, note)

        @echo.autocomplete("note")
        async def note_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            return [app_commands.Choice(name=n, value=n) for n in ("dance", "wave", "blink") if n.startswith(current)]

        @self.tree.error
        async def on_app_command_error(interaction: discord.Interaction, error: Exception) -> None:
            self.errors.append(getattr(error, "original", error))

        self.tree.add_command(echo, guild=discord.Object(guild_id))

    async def setup_hook(self) -> None:
        self.add_dynamic_items(AgainButton)
        await self.tree.sync(guild=discord.Object(self.guild_id))

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_resumed(self) -> None:
        self.resumed.set()

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        self.reactions.append(payload)


@pytest.fixture
async def emu():
    async with DiscordEmulator(ack_deadline=0.5) as emu:
        emu.guild = emu.add_guild("Test")
        emu.general = emu.add_channel(emu.guild, "general")
        emu.alice = emu.add_member(emu.guild, "alice")
        yield emu


@pytest.fixture
async def bot(emu):
    with point_discord_py_at(emu):
        bot = EchoBot(emu.guild.id)
        task = asyncio.create_task(bot.start(emu.token))
        await asyncio.wait_for(bot.ready.wait(), 5)
        yield bot
        await bot.close()
        await asyncio.wait_for(task, 5)
    assert emu.unexpected == []


def run_echo(emu, **options) -> Interaction:
    """Alice runs /echo with a picture; returns the emulator's side of the interaction."""
    return emu.send_slash(emu.alice, emu.general, "echo", options, attachments={"image": ("cat.png", PNG)})


async def test_the_bot_logs_in_syncs_its_command_and_gets_ready(emu, bot):
    """Login, one guild sync of /echo, IDENTIFY with the default intents, READY and the guild in cache."""
    assert bot.user.id == emu.bot_user.id and bot.application_id == emu.application_id
    assert [c["name"] for c in emu.commands(emu.guild)] == ["echo"] and emu.sync_count(emu.guild) == 1
    assert emu.identify_payloads[0]["intents"] == discord.Intents.default().value
    guild = bot.get_guild(emu.guild.id)
    assert guild.get_channel(emu.general.id).name == "general"
    assert guild.me.guild_permissions.attach_files
    assert [r.method + " " + r.path.removeprefix("/api/v10") for r in emu.requests[:3]] == [
        "GET /users/@me",
        "GET /oauth2/applications/@me",
        f"PUT /applications/{emu.application_id}/guilds/{emu.guild.id}/commands",
    ]


async def test_a_slash_command_defers_reads_the_cdn_and_answers_with_a_video_and_a_button(emu, bot):
    """Defer, download the attachment from the CDN, edit the original with an MP4 and a button."""
    inter = run_echo(emu, note="dance")
    await emu.wait_for(("PATCH", r"/messages/@original$"))
    [reply] = emu.messages_in(emu.general)
    assert reply is inter.original and reply.type == 20 and not reply.loading
    assert reply.content == "Done: dance" and reply.files == {"result.mp4": FAKE_MP4 + PNG}
    assert reply.attachments[0].content_type == "video/mp4"
    assert reply.custom_ids == ["echo:again:7"]
    assert inter.acked_type == 5 and inter.ack_latency < 0.5
    assert any(r.path.startswith("/attachments/") and r.status == 200 for r in emu.requests)


async def test_a_button_click_reaches_the_dynamic_item(emu, bot):
    """A click on the persistent button builds the DynamicItem from the custom_id and answers."""
    inter = run_echo(emu)
    await emu.wait_for(("PATCH", r"/messages/@original$"))
    click = emu.click(emu.alice, inter.original, "echo:again:7")
    await emu.wait_for(lambda: click.acked)
    assert bot.clicks == [(7, emu.alice.id)]
    assert click.acked_type == 4 and click.original.ephemeral and click.original.content == "again 7"


async def test_autocomplete_choices_come_back(emu, bot):
    """Type 4 with a focused option is answered with type 8 choices."""
    inter = emu.send_autocomplete(emu.alice, emu.general, "echo", {"note": "d"}, focused="note")
    await emu.wait_for(lambda: inter.acked)
    assert inter.acked_type == 8 and inter.choices == [{"name": "dance", "value": "dance"}]


async def test_an_ack_after_the_deadline_is_an_unknown_interaction(emu, bot):
    """Answering later than the 3 s (here 0.5 s) deadline gets 404 10062."""

    async def slow(bot, interaction, image, note):
        await asyncio.sleep(emu.ack_deadline + 0.1)
        await interaction.response.send_message("too late")

    bot.handler = slow
    inter = run_echo(emu)
    await emu.wait_for(lambda: bot.errors)
    assert isinstance(bot.errors[0], discord.NotFound) and bot.errors[0].code == 10062
    assert inter.rejections == [(404, 10062)] and not inter.acked and emu.messages_in(emu.general) == []


async def test_a_second_acknowledgement_is_refused(emu, bot):
    """Two concurrent defers (discord.py's guard does not see the race) → the second gets 400 40060."""

    async def twice(bot, interaction, image, note):
        results = await asyncio.gather(
            interaction.response.defer(), interaction.response.defer(), return_exceptions=True
        )
        bot.errors.extend(r for r in results if isinstance(r, Exception))

    bot.handler = twice
    inter = run_echo(emu)
    await emu.wait_for(lambda: bot.errors)
    assert isinstance(bot.errors[0], discord.HTTPException) and bot.errors[0].code == 40060
    assert inter.acked_type == 5 and inter.rejections == [(400, 40060)]


async def test_an_expired_token_fails_but_the_bot_token_still_posts(emu, bot):
    """After the interaction token expires, editing the original is 401 50027; channel.send works."""
    go_on = asyncio.Event()

    async def long_job(bot, interaction, image, note):
        await interaction.response.defer(thinking=True)
        await go_on.wait()
        try:
            await interaction.edit_original_response(content="done")
        except discord.HTTPException as error:
            bot.errors.append(error)
            video = discord.File(io.BytesIO(FAKE_MP4), "result.mp4")
            await interaction.channel.send(f"{interaction.user.mention} done", file=video)

    bot.handler = long_job
    inter = run_echo(emu)
    await emu.wait_for(lambda: inter.acked)
    emu.expire_token(inter)
    go_on.set()
    await emu.wait_for(("POST", rf"/channels/{emu.general.id}/messages$"))
    assert bot.errors[0].status == 401 and bot.errors[0].code == 50027 and inter.rejections == [(401, 50027)]
    placeholder, posted = emu.messages_in(emu.general)
    assert placeholder.loading and posted.webhook_id is None and posted.files == {"result.mp4": FAKE_MP4}


async def test_a_file_over_the_upload_limit_is_413(emu, bot):
    """A file bigger than the interaction's attachment_size_limit gets 413 40005; the bot saw the limit."""
    seen_limits = []

    async def big(bot, interaction, image, note):
        seen_limits.append(interaction.filesize_limit)
        await interaction.response.defer()
        try:
            await interaction.edit_original_response(attachments=[discord.File(io.BytesIO(b"x" * 2048), "big.mp4")])
        except discord.HTTPException as error:
            bot.errors.append(error)

    bot.handler = big
    inter = emu.send_slash(emu.alice, emu.general, "echo", attachments={"image": PNG}, attachment_size_limit=1024)
    await emu.wait_for(lambda: bot.errors)
    assert seen_limits == [1024]
    assert bot.errors[0].status == 413 and bot.errors[0].code == 40005 and inter.original.loading


async def test_injected_429s_are_retried_and_nothing_is_lost(emu, bot):
    """Route and global 429s (with Via and retry_after) are waited out by discord.py; one message results."""
    channel = bot.get_channel(emu.general.id)
    route = emu.inject_429(r"/channels/\d+/messages$", retry_after=0.05, times=2)
    emu.inject_429(r"/channels/\d+/messages$", retry_after=0.05, global_=True, times=1)
    message = await channel.send("hello")
    assert route.hits == 2 and [m.id for m in emu.messages_in(emu.general)] == [message.id]
    assert [r.status for r in emu.requests if r.method == "POST"] == [429, 429, 429, 200]
    emu.add_bucket(r"/channels/\d+/messages/\d+$", limit=1, per=0.2, method="PATCH")
    await message.edit(content="one")
    await message.edit(content="two")  # discord.py waits for the bucket's reset, from the headers
    assert [v.content for v in emu.message(message.id).history] == ["hello", "one"]
    assert all(r.status == 200 for r in emu.requests if r.method == "PATCH")


async def test_missing_channel_permissions_are_403(emu, bot):
    """Without ATTACH_FILES a file is 403 50013 while text still goes; without VIEW_CHANNEL it is 50001."""
    channel = bot.get_channel(emu.general.id)
    emu.set_permissions(emu.general, emu.bot_user, deny=Permission.ATTACH_FILES)
    await emu.wait_for(lambda: not channel.permissions_for(channel.guild.me).attach_files)
    with pytest.raises(discord.Forbidden) as refused:
        await channel.send(file=discord.File(io.BytesIO(FAKE_MP4), "result.mp4"))
    assert refused.value.code == 50013
    await channel.send("text is fine")
    emu.set_permissions(emu.general, emu.bot_role(emu.guild), deny=Permission.VIEW_CHANNEL)
    with pytest.raises(discord.Forbidden) as hidden:
        await channel.send("hello?")
    assert hidden.value.code == 50001
    assert [m.content for m in emu.messages_in(emu.general)] == ["text is fine"]


async def test_the_same_nonce_twice_makes_one_message(emu, bot):
    """channel.send(nonce=…) retried returns the first message instead of a duplicate."""
    channel = bot.get_channel(emu.general.id)
    first = await channel.send("job 42 done", nonce=42)
    again = await channel.send("job 42 done", nonce=42)
    assert first.id == again.id and len(emu.messages_in(emu.general)) == 1


async def test_after_a_gateway_drop_the_bot_resumes_and_missed_interactions_arrive(emu, bot):
    """Close 4000 → RESUME → RESUMED; an interaction sent while the bot was away is replayed and answered."""
    await emu.drop_gateway(4000)
    inter = run_echo(emu, note="while away")
    await asyncio.wait_for(bot.resumed.wait(), 5)
    await emu.wait_for(("PATCH", r"/messages/@original$"))
    assert emu.identifies == 1 and emu.resumes == 1 and emu.replayed >= 1
    assert inter.original.content == "Done: while away"


async def test_a_session_that_cannot_be_resumed_makes_the_bot_identify_again(emu, bot):
    """RESUME of an ended session gets op 9; what users do until the new IDENTIFY is lost; then all flows again."""

    async def before_identify(shard_id, *, initial=False):
        await asyncio.sleep(0 if initial else 0.3)  # discord.py waits 5 s before a re-IDENTIFY

    bot.before_identify_hook = before_identify
    await emu.drop_gateway(4000, resumable=False)
    await emu.wait_for(lambda: emu.connections == 3)  # RESUME refused, the client is waiting to IDENTIFY
    lost = run_echo(emu)
    await emu.wait_for(lambda: emu.identifies == 2)
    inter = run_echo(emu)
    await emu.wait_for(lambda: inter.original and not inter.original.loading)
    assert emu.resumes == 0 and [e for e, _ in emu.undelivered] == ["INTERACTION_CREATE"] and not lost.acked
    assert inter.original.files["result.mp4"] == FAKE_MP4 + PNG


async def test_the_first_follow_up_after_a_thinking_defer_fills_the_placeholder(emu, bot):
    """As on Discord: follow-up #1 replaces "is thinking…" (keeping its ephemerality), #2 is a new message."""

    async def followups(bot, interaction, image, note):
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send("first")
        await interaction.followup.send("second")

    bot.handler = followups
    inter = run_echo(emu)
    await emu.wait_for(lambda: inter.followups)
    assert inter.original.content == "first" and inter.original.ephemeral and not inter.original.loading
    assert [m.content for m in inter.followups] == ["second"]
    assert [m.content for m in emu.messages_in(emu.general)] == ["second"]


async def test_reactions_are_dispatched_and_counted(emu, bot):
    """A user's ⭐ reaches on_raw_reaction_add; the bot's own reaction is stored; fetch_message counts both."""
    channel = bot.get_channel(emu.general.id)
    message = await channel.send("vote here")
    await message.add_reaction("⭐")
    emu.react(emu.alice, message.id, "⭐")
    await emu.wait_for(lambda: len(bot.reactions) == 2)
    assert [(r.user_id, str(r.emoji)) for r in bot.reactions] == [(emu.bot_user.id, "⭐"), (emu.alice.id, "⭐")]
    assert emu.message(message.id).reactions == {"⭐": [emu.bot_user.id, emu.alice.id]}
    fetched = await channel.fetch_message(message.id)
    assert [(str(r.emoji), r.count, r.me) for r in fetched.reactions] == [("⭐", 2, True)]


async def test_invalid_command_definitions_are_refused_like_discord(emu):
    """Upper-case names, long descriptions and required-after-optional options get 400 50035 with paths."""
    bad = [
        {"name": "Echo", "description": "x", "type": 1},
        {"name": "ok", "description": "d" * 101, "type": 1},
        {
            "name": "opts",
            "description": "x",
            "options": [
                {"name": "a", "description": "x", "type": 3},
                {"name": "b", "description": "x", "type": 3, "required": True},
            ],
        },
    ]
    url = f"{emu.api_base}/applications/{emu.application_id}/guilds/{emu.guild.id}/commands"
    async with (
        aiohttp.ClientSession() as session,
        session.put(url, json=bad, headers={"Authorization": f"Bot {emu.token}"}) as response,
    ):
        body = await response.json()
    assert response.status == 400 and body["code"] == 50035
    assert set(body["errors"]) == {"0", "1", "2"} and "name" in body["errors"]["0"]
    assert emu.commands(emu.guild) == [] and emu.sync_count(emu.guild) == 0
