"""Submitting a job: settled at once, refused with a reason, never charged for a refusal, never twice."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import Session, select

from backends.base import CameraMove
from worker import events, ledger
from worker.errors import ImageRejected, InsufficientCredits, InvalidParameters, LimitReached
from worker.jobs import JobParams
from worker.models import GuildSettings, Job, Transfer
from worker.settings import Settings
from worker.submit import quote, submit

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
PICTURE = SAMPLE.read_bytes()


@pytest.fixture
def settings(tmp_path, db_url):
    return Settings(data_dir=tmp_path, database_url=db_url, daily_free_credits=0, max_active_per_user=3)


def _grant(engine, credits, user="u1", guild="g1"):
    with Session(engine) as s:
        account = ledger.member_account(s, guild, user)
        ledger.grant(s, account.id, credits, key=f"grant-{guild}-{user}")
        return account.id


def _balance(engine, account_id):
    with Session(engine) as s:
        return ledger.balance(s, account_id)


def _jobs(engine):
    with Session(engine) as s:
        return s.exec(select(Job)).all()


def _fake(**kw):
    return JobParams(prompt="gentle waves", duration=3, backend="fake", **kw)


def test_a_submit_writes_the_job_reserves_its_price_and_wakes_a_worker(engine, settings):
    """The job is queued with its price held; one kick says a job needs attention."""
    account = _grant(engine, 10)
    kicks = []
    receipt = submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-1",
                     kick=kicks.append)

    assert (receipt.position, receipt.price_credits, receipt.duplicate) == (1, 3, False)
    assert receipt.eta_seconds > 0
    assert kicks == [1]
    (job,) = _jobs(engine)
    assert (job.state, job.key, job.account_id, job.guild_id) == ("queued", "i-1", account, "g1")
    assert Path(job.source_path).read_bytes() == PICTURE
    assert (_balance(engine, account).available, _balance(engine, account).held) == (7, 3)
    (queued,) = events.pending(engine)
    assert queued.kind == "queued" and queued.payload["position"] == 1 and queued.payload["key"] == "i-1"


def test_the_same_key_twice_is_the_same_job_charged_once(engine, settings):
    """A resubmitted interaction returns the first receipt's job; nothing more is held or queued."""
    account = _grant(engine, 10)
    first = submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-1")
    kicks = []
    again = submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-1",
                   kick=kicks.append)

    assert again.job_id == first.job_id and again.duplicate
    assert kicks == []
    assert len(_jobs(engine)) == 1 and _balance(engine, account).held == 3
    assert [e.kind for e in events.pending(engine)] == ["queued"]


@pytest.mark.parametrize(
    ("image", "params", "error", "says"),
    [
        (b"not a picture at all", _fake(), ImageRejected, "not a picture"),
        (PICTURE, JobParams(prompt="  ", backend="fake"), InvalidParameters, "prompt is empty"),
        (PICTURE, JobParams(prompt="p", motion=9, backend="fake"), InvalidParameters, "motion 9"),
        (PICTURE, JobParams(prompt="p", backend="lcoal"), InvalidParameters, "lcoal"),
    ],
)
def test_bad_input_is_refused_with_what_would_work_and_costs_nothing(engine, settings, image, params, error, says):
    """Refusals name the problem; no job, no hold, no event."""
    account = _grant(engine, 10)
    with pytest.raises(error, match=says):
        submit(engine, settings, image=image, params=params, member=("g1", "u1"), key="i-1")
    assert _jobs(engine) == [] and events.pending(engine) == []
    assert (_balance(engine, account).available, _balance(engine, account).held) == (10, 0)


def test_a_tiny_picture_is_refused_from_its_header(engine, settings):
    """The quick check reads the header only, and says what size would do."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "PNG")
    with pytest.raises(ImageRejected, match="at least 128 px"):
        submit(engine, settings, image=buf.getvalue(), params=_fake(), member=("g1", "u1"))


def test_not_enough_credits_says_the_balance_and_the_price(engine, settings):
    """The member learns both numbers and keeps every credit."""
    account = _grant(engine, 2)
    with pytest.raises(InsufficientCredits, match="this costs 3 credits but you have 2"):
        submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"))
    assert _jobs(engine) == [] and _balance(engine, account).available == 2


def test_a_member_over_the_cap_of_unfinished_jobs_is_refused_until_one_ends(engine, settings):
    """max_active_per_user counts unfinished jobs; the refusal costs nothing and points at /jobs."""
    account = _grant(engine, 100)
    for i in range(3):
        submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key=f"i-{i}")
    with pytest.raises(LimitReached, match="already have 3 animations in progress and the limit is 3"):
        submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-4")
    assert _balance(engine, account).held == 9

    with Session(engine) as s:
        job = s.exec(select(Job).where(Job.key == "i-0")).one()
        job.state = "failed"
        s.add(job)
        s.commit()
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-5")


def test_a_guild_sets_its_own_cap_and_cooldown(engine, settings):
    """Guild settings override the defaults: one job at a time, then a pause between submits."""
    _grant(engine, 100)
    with Session(engine) as s:
        s.add(GuildSettings(guild_id="g1", max_concurrent_per_user=5, cooldown_seconds=600))
        s.commit()
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-1")
    with pytest.raises(LimitReached, match=r"please wait \d+ s before your next animation"):
        submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), key="i-2")


def test_the_server_wide_cap_stops_a_busy_server(engine, tmp_path, db_url):
    """max_active_per_guild counts every member's unfinished jobs in the server."""
    settings = Settings(data_dir=tmp_path, database_url=db_url, daily_free_credits=10, max_active_per_guild=2)
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "a"))
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "b"))
    with pytest.raises(LimitReached, match="this server already has 2 animations in progress"):
        submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "c"))
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g2", "c"))  # another server is not affected


def test_todays_free_credits_are_granted_on_the_first_submit_of_the_day(engine, tmp_path, db_url):
    """A new member can animate at once; a second submit the same day grants nothing more."""
    settings = Settings(data_dir=tmp_path, database_url=db_url, daily_free_credits=20)
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "new"))
    submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "new"))
    with Session(engine) as s:
        account = ledger.member_account(s, "g1", "new")
        grants = s.exec(select(Transfer).where(Transfer.kind == "grant")).all()
        assert ledger.balance(s, account.id).available == 20 - 6
    assert len(grants) == 1


def test_without_a_chosen_backend_the_hold_covers_the_dearest_first_choice(tmp_path):
    """The subject is unknown until a worker looks, so the quote is the highest first-choice price."""
    settings = Settings(data_dir=tmp_path)
    assert quote(settings, JobParams(prompt="p", duration=5)) == 0  # only `local` is usable offline
    assert quote(settings, JobParams(prompt="p", duration=5, backend="fake")) == 5


def test_a_server_sets_its_own_price_per_second(engine, settings):
    """/animabot price writes guild prices; the hold and the quote use them."""
    account = _grant(engine, 20)
    with Session(engine) as s:
        s.add(GuildSettings(guild_id="g1", prices={"fake": 3}))
        s.commit()
    receipt = submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"))
    assert receipt.price_credits == 9 and _balance(engine, account).held == 9


def test_an_option_the_chosen_backend_cannot_honour_is_refused_by_name(engine, settings, monkeypatch):
    """A camera move the backend lacks is refused at submit, naming what it supports; nothing is held."""
    from backends.fake import FakeBackend

    narrow = FakeBackend.capabilities.__class__(**{**FakeBackend.capabilities.__dict__,
                                                   "cameras": frozenset({CameraMove.ZOOM_IN})})
    monkeypatch.setattr(FakeBackend, "capabilities", narrow)
    account = _grant(engine, 10)
    with pytest.raises(InvalidParameters, match="camera 'orbit-left' is not supported"):
        submit(engine, settings, image=PICTURE, params=_fake(camera=CameraMove.ORBIT_LEFT), member=("g1", "u1"))
    assert _jobs(engine) == [] and _balance(engine, account).held == 0


# -- prompt-only jobs: the picture is painted first ---------------------------------------------------


def test_a_prompt_without_a_picture_is_refused_when_nothing_can_paint_one(engine, settings):
    """No text-to-image model configured: the refusal says it needs a picture and what would enable it."""
    account = _grant(engine, 10)
    with pytest.raises(InvalidParameters, match="needs a picture") as refused:
        submit(engine, settings, image=None, params=_fake(), member=("g1", "u1"), key="i-1")
    assert "ANIMABOT_REPLICATE_API_TOKEN" in refused.value.message and "ANIMABOT_FAL_KEY" in refused.value.message
    assert _jobs(engine) == [] and events.pending(engine) == []
    assert (_balance(engine, account).available, _balance(engine, account).held) == (10, 0)


def test_a_prompt_without_a_picture_holds_the_clip_and_the_still(engine, settings):
    """With a painter the job is queued without a source; its hold is the clip's price plus the still's."""
    painting = settings.model_copy(update={"text_to_image": "fake"})
    account = _grant(engine, 10)
    receipt = submit(engine, painting, image=None, params=_fake(), member=("g1", "u1"), key="i-1")

    assert receipt.price_credits == 3 + 1  # 3 s on fake, and the fake's still
    (job,) = _jobs(engine)
    assert job.source_path is None and job.detail["paint"] == {"backend": "fake", "model": "still", "credits": 1}
    assert _balance(engine, account).held == 4


@pytest.mark.parametrize(("configured", "expected"), [
    ({"replicate_api_token": "r8_x"}, "replicate:black-forest-labs/flux-schnell"),
    ({"fal_key": "k"}, "fal:fal-ai/flux/dev"),
    ({"replicate_api_token": "r8_x", "fal_key": "k", "text_to_image": "fal"}, "fal:fal-ai/flux/dev"),
])
def test_the_painter_is_the_first_configured_provider_unless_one_is_chosen(tmp_path, configured, expected):
    """By default the first usable backend with a text-to-image model paints; the setting picks another."""
    from worker.stills import require_painter

    assert require_painter(Settings(data_dir=tmp_path, **configured)).label == expected


@pytest.mark.parametrize(("choice", "says"), [
    ("none", "turned off"),
    ("local", "local cannot paint a picture from text"),
    ("replicate", "set ANIMABOT_REPLICATE_API_TOKEN"),
    ("fake:sdxl", "fake cannot paint 'sdxl'"),
])
def test_a_painter_that_cannot_paint_is_refused_with_what_to_configure(engine, tmp_path, choice, says):
    """A wrong ANIMABOT_TEXT_TO_IMAGE refuses prompt-only jobs by name, and charges nothing."""
    settings = Settings(data_dir=tmp_path, daily_free_credits=10, text_to_image=choice)
    with pytest.raises(InvalidParameters, match=says):
        submit(engine, settings, image=None, params=_fake(), member=("g1", "u1"))
    assert _jobs(engine) == []


def test_the_quote_of_a_prompt_only_job_adds_the_still(tmp_path):
    """The still is priced from the price table (FLUX schnell: 1 credit) on top of the dearest first choice."""
    keyed = Settings(data_dir=tmp_path, replicate_api_token="r8_x")
    params = JobParams(prompt="p", duration=5)
    assert quote(keyed, params, picture=False) == quote(keyed, params) + 1
    with pytest.raises(InvalidParameters, match="needs a picture"):
        quote(Settings(data_dir=tmp_path), params, picture=False)


# -- end frames ----------------------------------------------------------------------------------------


def _png(colour=(200, 40, 90), size=(320, 180)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_an_end_frame_is_checked_and_kept_with_the_job(engine, settings):
    """A backend that can end on a frame: the job keeps the picture; the price is the clip's."""
    account = _grant(engine, 10)
    end = _png()
    receipt = submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), end_image=end)
    (job,) = _jobs(engine)
    assert Path(job.detail["end_frame"]["path"]).read_bytes() == end
    assert receipt.price_credits == 3 and _balance(engine, account).held == 3


@pytest.mark.parametrize(("end", "says"), [
    (b"not a picture at all", "the end frame cannot be used: .*not a picture"),
    (_png(size=(40, 30)), "the end frame cannot be used: .*at least 128 px"),
])
def test_a_bad_end_frame_is_refused_like_a_bad_picture(engine, settings, end, says):
    """The end frame's header is checked like the picture's; the refusal says which of the two is wrong."""
    account = _grant(engine, 10)
    with pytest.raises(ImageRejected, match=says):
        submit(engine, settings, image=PICTURE, params=_fake(), member=("g1", "u1"), end_image=end)
    assert _jobs(engine) == [] and _balance(engine, account).held == 0


def test_an_end_frame_the_chosen_backend_cannot_honour_is_refused_by_name(engine, settings):
    """local moves a camera over one picture: refused before anything is held, naming the models that can."""
    account = _grant(engine, 10)
    with pytest.raises(InvalidParameters, match="local cannot end on a given frame") as refused:
        submit(engine, settings, image=PICTURE, params=JobParams(prompt="p", backend="local"), member=("g1", "u1"),
               end_image=_png())
    assert "replicate:kwaivgi/kling-v2.1" in refused.value.message
    assert _jobs(engine) == [] and _balance(engine, account).held == 0


def test_an_end_frame_with_nothing_here_that_can_end_on_it_is_refused(engine, settings):
    """No backend named and no model that takes an end frame configured: every route fails, so the submit does."""
    account = _grant(engine, 10)
    with pytest.raises(InvalidParameters, match="nothing here can end a clip on a given frame"):
        submit(engine, settings, image=PICTURE, params=JobParams(prompt="p"), member=("g1", "u1"), end_image=_png())
    assert _jobs(engine) == [] and _balance(engine, account).held == 0


def test_an_end_frame_routes_to_a_model_that_takes_one_at_its_end_frame_price(tmp_path):
    """Kling ends on a frame only in its dearer pro mode: the quote says so, for the model named or routed."""
    keyed = Settings(data_dir=tmp_path, replicate_api_token="r8_x")
    kling = JobParams(prompt="p", duration=5, backend="replicate", model="kwaivgi/kling-v2.1")
    assert (quote(keyed, kling), quote(keyed, kling, end_frame=True)) == (25, 45)
    with pytest.raises(InvalidParameters, match="minimax/hailuo-02 cannot end on a given frame"):
        quote(keyed, JobParams(prompt="p", duration=6, backend="replicate", model="minimax/hailuo-02"), end_frame=True)
    # Routed: a landscape's Wan cannot, so the end-frame models are tried after it; the hold covers the dearest.
    assert quote(keyed, JobParams(prompt="p", duration=5), end_frame=True) == 60  # Luma Ray for products
