"""The daily free credits: once per member and UTC day, whether beat or a submit grants them first."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlmodel import Session, select

from worker import ledger
from worker.grants import grant_daily_to_active_members
from worker.jobs import JobParams, create_job
from worker.models import GuildSettings, Job, Transfer, utcnow
from worker.settings import Settings

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


def _member_with_job(engine, guild, user, *, days_ago=0):
    with Session(engine) as s:
        account = ledger.member_account(s, guild, user).id
    job = create_job(engine, JobParams(prompt="p"), source_path=SAMPLE)
    with Session(engine) as s:
        row = s.get(Job, job.id)
        row.account_id, row.created_at = account, utcnow() - timedelta(days=days_ago)
        s.add(row)
        s.commit()
    return account


def test_active_members_get_todays_grant_once_with_their_servers_amount(engine, tmp_path):
    """Members active in the last 30 days get it, at their server's amount; running it again gives nothing."""
    settings = Settings(data_dir=tmp_path, daily_free_credits=20)
    regular = _member_with_job(engine, "g1", "regular")
    generous = _member_with_job(engine, "g2", "lucky")
    gone = _member_with_job(engine, "g1", "gone", days_ago=45)
    with Session(engine) as s:
        s.add(GuildSettings(guild_id="g2", daily_grant=50))
        s.commit()

    assert grant_daily_to_active_members(engine, settings) == 2
    assert grant_daily_to_active_members(engine, settings) == 0
    with Session(engine) as s:
        balances = {a: ledger.balance(s, a).available for a in (regular, generous, gone)}
        assert len(s.exec(select(Transfer).where(Transfer.kind == "grant")).all()) == 2
    assert balances == {regular: 20, generous: 50, gone: 0}
