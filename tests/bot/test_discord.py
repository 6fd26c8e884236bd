"""The Discord front end end to end: the real discord.py bot, the real job system, a Discord emulator.

A member runs /animate in the emulator; the bot (started by `animabot run`'s code, embedded mode, on
SQLite) acknowledges, downloads the picture from the emulator's CDN, submits the job, edits one status
message as the job moves and delivers the clip with its buttons. The emulator enforces Discord's rules
(3-second acknowledgement, 15-minute token, upload limits, 429s, permissions).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from emulators.discord_api import DiscordEmulator, point_discord_py_at
from PIL import Image
from sqlmodel import Session, select

from bot import serve
from worker import ledger
from worker.db import init_db
from worker.models import Clip, Job
from worker.settings import Settings

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


def _picture(size: int = 256) -> bytes:
    buf = io.BytesIO()
    with Image.open(SAMPLE) as im:
        im.convert("RGB").resize((size, size)).save(buf, "PNG")
    return buf.getvalue()


PICTURE = _picture()


class Deployment:
    """`animabot run` (embedded) connected to the emulator, stoppable and restartable on one database."""

    def __init__(self, emu: DiscordEmulator, settings: Settings) -> None:
        self.emu, self.settings = emu, settings
        self.db = init_db(settings)
        self.stop_event: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.stop_event = asyncio.Event()
        ready = asyncio.Event()
        self.task = asyncio.create_task(
            serve.run(self.db, self.settings, stop=self.stop_event, ready=lambda port: ready.set()))
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({waiter, self.task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        assert ready.is_set(), "the bot did not get ready"

    async def stop(self) -> None:
        assert self.stop_event is not None and self.task is not None
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)

    def credits(self, user_id: int) -> ledger.Balance:
        with Session(self.db) as s:
            account = ledger.member_account(s, str(self.emu.guild.id), str(user_id))
            return ledger.balance(s, account.id)


@pytest.fixture
async def emu():
    async with DiscordEmulator() as emu:
        emu.guild = emu.add_guild("Test")
        emu.general = emu.add_channel(emu.guild, "general")
        emu.alice = emu.add_member(emu.guild, "alice")
        yield emu


@pytest.fixture
def settings(tmp_path, emu):
    return Settings(
        data_dir=tmp_path, output_long_side=256, discord_token=emu.token, discord_dev_guild=str(emu.guild.id),
        discord_cdn_hosts=["127.0.0.1"], status_edit_interval=0.2, daily_free_credits=10, poll_tick=0.05,
        web_port=0, retry_backoff=0.0, default_duration=1.0,
    )


@pytest.fixture
async def bot(emu, settings):
    with point_discord_py_at(emu):
        deployment = Deployment(emu, settings)
        await deployment.start()
        yield deployment
        if not deployment.task.done():
            await deployment.stop()
    assert emu.unexpected == []


def _ephemeral(emu, channel):
    return [m for m in emu.messages_in(channel, ephemeral=True) if m.ephemeral]


def _jobs(bot):
    with Session(bot.db) as s:
        return s.exec(select(Job).order_by(Job.id)).all()


async def _clip_message(emu, channel, *, since_count=0, timeout=60.0):
    """The next message in ``channel`` that carries the animation."""
    def found():
        messages = [m for m in emu.messages_in(channel) if "animation.mp4" in m.files]
        return messages[since_count] if len(messages) > since_count else None
    return await emu.wait_for(found, timeout=timeout)


async def test_animate_acknowledges_at_once_and_delivers_the_clip_with_its_buttons(emu, bot, settings):
    """Deferred well inside 3 s; one status message edited through the states; the MP4 and six buttons."""
    await bot.stop()  # generations that take a moment, as real ones do, so each state outlives an edit interval
    bot.settings = settings.model_copy(update={"fake_latency": 0.5})
    await bot.start()
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "slow push-in", "model": "fake:frozen,ok"},
                           attachments={"image": ("astronaut.png", PICTURE)})
    message = await _clip_message(emu, emu.general)

    assert inter.acked_type == 5 and inter.ack_latency < 3.0  # inside Discord's deadline
    assert message.id == inter.original.id  # the status message became the result
    seen = " | ".join(version.content or "" for version in message.history)
    assert "queued" in seen and "that one came out frozen, trying again" in seen
    assert message.files["animation.mp4"][4:8] == b"ftyp"
    assert sorted(message.custom_ids) == sorted(f"anim:{a}:1" for a in
                                                ("retry", "extend", "vary", "info", "publish", "delete"))
    assert "slow push-in" in message.content and f"<@{emu.alice.id}>" in message.content
    assert bot.credits(emu.alice.id) == ledger.Balance(available=9, held=0)  # 1 s on fake: 1 credit


async def test_bad_input_gets_an_ephemeral_reason_and_costs_nothing(emu, bot):
    """Not a picture, and a motion out of range: only the member sees why; no job, no charge."""
    text = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p"},
                          attachments={"image": ("notes.png", b"just some text, not a picture")})
    await emu.wait_for(lambda: _ephemeral(emu, emu.general))
    [refusal] = _ephemeral(emu, emu.general)
    assert "not a picture" in refusal.content and text.acked_type == 5
    assert emu.messages_in(emu.general) == []  # the public "thinking…" was taken back

    no_picture = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "only words"})
    await emu.wait_for(lambda: no_picture.acked_type is not None)
    assert no_picture.original.ephemeral and "needs a picture" in no_picture.original.content
    assert _jobs(bot) == [] and bot.credits(emu.alice.id).held == 0


async def test_not_enough_credits_says_the_balance_and_the_price(emu, bot):
    """A 10-second fake clip costs 10; alice has 10 after today's grant, so two ask for 20."""
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake", "duration": 11.0},
                           attachments={"image": ("a.png", PICTURE)})
    await emu.wait_for(lambda: _ephemeral(emu, emu.general))
    [refusal] = _ephemeral(emu, emu.general)
    assert "this costs 11 credits but you have 10" in refusal.content and inter.acked_type == 5
    assert bot.credits(emu.alice.id).available == 10


async def test_a_retry_click_makes_a_new_job_and_details_show_its_lineage(emu, bot):
    """🔁 on the result starts a job with a new seed whose parent is the first; ℹ️ shows where it came from."""
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE)})
    first = await _clip_message(emu, emu.general)
    emu.click(emu.alice, first, "anim:retry:1")
    retried = await _clip_message(emu, emu.general, since_count=1)
    second = _jobs(bot)[1]
    assert second.parent_job_id == 1 and second.prompt == "p" and second.seed != _jobs(bot)[0].seed

    info = emu.click(emu.alice, retried, f"anim:info:{second.id}")
    await emu.wait_for(lambda: info.original is not None and "made from" in (info.original.content or ""))
    assert info.original.ephemeral and "job 1" in info.original.content


async def test_a_restart_between_request_and_result_delivers_once_and_old_buttons_work(emu, bot, settings):
    """The bot stops while the job runs; after a restart the clip arrives exactly once and its buttons work."""
    slow = settings.model_copy(update={"fake_latency": 2.0})
    bot.settings = slow
    await bot.stop()
    await bot.start()
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE)})
    await emu.wait_for(lambda: any("generating" in (m.content or "") for m in emu.messages_in(emu.general)))
    await bot.stop()
    await bot.start()
    message = await _clip_message(emu, emu.general)
    await asyncio.sleep(1.0)
    assert len([m for m in emu.messages_in(emu.general) if "animation.mp4" in m.files]) == 1

    details = emu.click(emu.alice, message, "anim:info:1")
    await emu.wait_for(lambda: details.original is not None and "job 1" in (details.original.content or ""))


async def test_a_result_after_the_token_expired_is_posted_with_the_bot_token_as_a_reply(emu, bot, settings):
    """Past the 15-minute token the clip is a new channel message replying to the request, sent once."""
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                           attachments={"image": ("a.png", PICTURE)})
    await emu.wait_for(lambda: _jobs(bot))  # submitted: the reply token is what it answers with from now on
    emu.expire_token(inter)
    message = await _clip_message(emu, emu.general)
    assert message.id != inter.original.id and message.webhook_id is None
    assert message.nonce and int(message.message_reference["message_id"]) == inter.original.id
    await emu.wait_for(lambda: "done" in (emu.message(inter.original.id).content or ""))


async def test_an_upload_limit_smaller_than_the_clip_gets_a_smaller_encode(emu, bot):
    """A 40 KiB limit: the bot re-encodes the clip to fit instead of failing the upload."""
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake", "duration": 2.0},
                           attachments={"image": ("a.png", PICTURE)}, attachment_size_limit=40_000)
    message = await _clip_message(emu, emu.general)
    assert len(message.files["animation.mp4"]) <= 40_000 and inter.acked_type == 5


async def test_429s_slow_the_bot_down_and_lose_nothing(emu, bot):
    """Edits rate-limited three times still land; the clip arrives."""
    emu.inject_429(r"/webhooks/", retry_after=0.3, times=3)
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE)})
    await _clip_message(emu, emu.general)
    assert sum(1 for r in emu.requests if r.status == 429) == 3


async def test_publish_posts_to_the_gallery_and_stars_count_as_votes(emu, bot):
    """⭐ by the owner cross-posts the clip; members' ⭐ there are votes; /gallery lists it."""
    gallery = emu.add_channel(emu.guild, "gallery")
    bob = emu.add_member(emu.guild, "bob")
    admin = emu.add_member(emu.guild, "admin", permissions=(1 << 5) | (1 << 10) | (1 << 11))
    setup = emu.send_slash(admin, emu.general, "animabot gallery", {"channel": gallery})
    await emu.wait_for(lambda: setup.original is not None)
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE)})
    result = await _clip_message(emu, emu.general)

    refused = emu.click(bob, result, "anim:publish:1")
    await emu.wait_for(lambda: refused.original is not None and "only the member" in (refused.original.content or ""))
    emu.click(emu.alice, result, "anim:publish:1")
    posted = await _clip_message(emu, gallery)
    await emu.wait_for(lambda: posted.reactions.get("⭐"))  # the bot starts the voting
    emu.react(bob, posted, "⭐")
    emu.react(admin, posted, "⭐")
    await emu.wait_for(lambda: _votes(bot) == 2)
    listing = emu.send_slash(bob, emu.general, "gallery")
    await emu.wait_for(lambda: listing.original is not None and "⭐ 2" in (listing.original.content or ""))


def _votes(bot):
    with Session(bot.db) as s:
        clip = s.exec(select(Clip)).first()
        return clip.votes if clip else 0


async def test_admin_commands_refuse_members_without_manage_server(emu, bot):
    """Rights are checked in the handler even if a server lets everyone see the command."""
    bob = emu.add_member(emu.guild, "bob")
    with pytest.raises(PermissionError):
        emu.send_slash(bob, emu.general, "animabot daily", {"credits": 500})


async def test_a_clip_that_cannot_fit_the_limit_is_linked_to_the_web_endpoint(emu, bot, settings):
    """A 2 KiB limit fits no watchable encode: the message links the clip, and the link serves it."""
    import re
    import socket

    import aiohttp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await bot.stop()
    bot.settings = settings.model_copy(update={"public_url": f"http://127.0.0.1:{port}", "web_port": port})
    await bot.start()
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                           attachments={"image": ("a.png", PICTURE)}, attachment_size_limit=2048)
    await emu.wait_for(lambda: inter.original and "too big to attach" in (inter.original.content or ""), timeout=60)
    message = emu.message(inter.original.id)
    assert message.files == {}
    link = re.search(r"http://127\.0\.0\.1:\d+/clips/\S+", message.content).group(0)
    async with aiohttp.ClientSession() as http, http.get(link) as response:
        assert response.status == 200 and (await response.read())[4:8] == b"ftyp"
    async with aiohttp.ClientSession() as http, http.get(link.replace("/clips/1/", "/clips/2/")) as response:
        assert response.status == 403


async def test_a_picture_over_the_upload_cap_is_refused_before_downloading(emu, bot, settings):
    """The attachment's declared size is checked first; the CDN is never asked for it."""
    big = _picture(1024)
    await bot.stop()
    bot.settings = settings.model_copy(update={"max_upload_bytes": len(big) - 1})
    await bot.start()
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p"}, attachments={"image": ("big.png", big)})
    await emu.wait_for(lambda: _ephemeral(emu, emu.general))
    assert "the limit is" in _ephemeral(emu, emu.general)[0].content
    assert not [r for r in emu.requests if "/attachments/" in r.path]


async def test_commands_are_synced_once_not_on_every_start(emu, bot):
    """A restart with unchanged commands does not sync again (Discord limits command creates per day)."""
    assert emu.sync_count(emu.guild) == 1
    await bot.stop()
    await bot.start()
    assert emu.sync_count(emu.guild) == 1


async def test_credits_shows_the_balance_todays_grant_and_recent_charges(emu, bot):
    """After one 1-second fake clip: 9 left of today's 10, the charge listed; only the member sees it."""
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE)})
    await _clip_message(emu, emu.general)
    inter = emu.send_slash(emu.alice, emu.general, "credits")
    await emu.wait_for(lambda: inter.original is not None and "available" in (inter.original.content or ""))
    content = inter.original.content
    assert inter.original.ephemeral and "**9** credits available" in content
    assert "daily free credits" in content and "charged (job 1)" in content


async def test_jobs_lists_unfinished_jobs_and_its_cancel_button_refunds(emu, bot, settings):
    """A slow job shows in /jobs with a cancel button; pressing it ends the job and gives the credits back."""
    await bot.stop()
    bot.settings = settings.model_copy(update={"fake_latency": 30.0})
    await bot.start()
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "slow one", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE)})
    await emu.wait_for(lambda: _jobs(bot) and _jobs(bot)[0].state == "generating", timeout=30)
    listing = emu.send_slash(emu.alice, emu.general, "jobs")
    await emu.wait_for(lambda: listing.original is not None and "slow one" in (listing.original.content or ""))
    assert listing.original.custom_ids == ["anim:cancel:1"]
    assert bot.credits(emu.alice.id).held == 1
    click = emu.click(emu.alice, listing.original, "anim:cancel:1")
    await emu.wait_for(lambda: click.original is not None and "canceled" in (click.original.content or ""))
    assert _jobs(bot)[0].state == "canceled" and bot.credits(emu.alice.id) == ledger.Balance(10, 0)


async def test_model_autocomplete_offers_usable_backends_with_their_price(emu, bot):
    """Typing in `model` lists what can run here and what it costs."""
    inter = emu.send_autocomplete(emu.alice, emu.general, "animate", {"prompt": "p"}, focused="model")
    await emu.wait_for(lambda: inter.choices is not None)
    labels = [c["name"] for c in inter.choices]
    assert "local — free" in labels and "fake — 1 credits for 1 s" in labels


async def test_extend_continues_the_clip_from_its_last_frame(emu, bot):  # about 15 s: two real clips
    """➕ makes a job whose clip is the old one plus five seconds, cross-faded where they meet."""
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake", "duration": 4.0},
                   attachments={"image": ("a.png", PICTURE)})
    first = await _clip_message(emu, emu.general)
    emu.click(emu.alice, first, "anim:extend:1")
    await emu.wait_for(lambda: len(_jobs(bot)) == 2 and _jobs(bot)[1].job_state.terminal, timeout=120)
    extension = _jobs(bot)[1]
    assert extension.state == "succeeded", extension.error_message
    await _clip_message(emu, emu.general, since_count=1)
    assert extension.parent_job_id == 1 and extension.duration == 5.0
    with Session(bot.db) as s:
        clip = s.exec(select(Clip).where(Clip.job_id == extension.id)).one()
    assert clip.duration == pytest.approx(4 + 5 - bot.settings.stitch_overlap, abs=0.05)


async def test_a_prompt_without_a_picture_is_painted_first_then_animated(emu, bot, settings):
    """With a text-to-image model configured, /animate with only a prompt paints a picture and delivers its clip."""
    from worker import events

    await bot.stop()
    bot.settings = settings.model_copy(update={"text_to_image": "fake"})
    await bot.start()
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "a lighthouse at dusk", "model": "fake"})
    message = await _clip_message(emu, emu.general)

    assert inter.acked_type == 5 and message.id == inter.original.id
    assert message.files["animation.mp4"][4:8] == b"ftyp"
    [job] = _jobs(bot)
    assert job.detail["paint"] == {"backend": "fake", "model": "still", "credits": 1, "tries": 1, "cost_usd": 0.0}
    assert Path(job.source_path).name == "01-validate-source.png"
    assert "painting" in [e.kind for e in events.history(bot.db, job.id)]
    assert bot.credits(emu.alice.id) == ledger.Balance(available=10 - 2, held=0)  # the still and 1 s on fake


async def test_an_end_frame_is_downloaded_and_sent_to_a_model_that_can_end_on_it(emu, bot):
    """`end_frame:` is fetched from the CDN like the picture and kept with the job; the clip arrives."""
    end = _picture(320)
    emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "fake"},
                   attachments={"image": ("a.png", PICTURE), "end_frame": ("end.png", end)})
    await _clip_message(emu, emu.general)
    [job] = _jobs(bot)
    assert job.state == "succeeded"
    assert Path(job.detail["end_frame"]["path"]).read_bytes() == end
    assert Path(job.detail["end_frame"]["fitted"]).name == "03-enhance-end-256x256-crop.png"


async def test_an_end_frame_the_chosen_model_cannot_honour_is_refused_by_name_for_free(emu, bot):
    """local cannot end on a given frame: only the member sees why (and which models can); nothing is charged."""
    inter = emu.send_slash(emu.alice, emu.general, "animate", {"prompt": "p", "model": "local"},
                           attachments={"image": ("a.png", PICTURE), "end_frame": ("end.png", PICTURE)})
    await emu.wait_for(lambda: _ephemeral(emu, emu.general))
    [refusal] = _ephemeral(emu, emu.general)
    assert "local cannot end on a given frame" in refusal.content and "kwaivgi/kling-v2.1" in refusal.content
    assert inter.acked_type == 5 and _jobs(bot) == []
    assert bot.credits(emu.alice.id) == ledger.Balance(available=10, held=0)
