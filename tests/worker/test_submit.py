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
