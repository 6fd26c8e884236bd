"""The pipeline runs every stage, records it on the job, retries bad outputs and ends cleanly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session, select

from backends import video
from backends.base import CameraMove
from backends.fake import FakeBackend
from worker import ledger, quality
from worker.artifacts import STAGES
from worker.db import init_db
from worker.errors import InsufficientCredits
from worker.jobs import JobParams, create_job
from worker.models import Attempt, Clip, GuildSettings, Job, JobStage
from worker.pipeline import Pipeline
from worker.settings import Settings

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"


@pytest.fixture
def settings(tmp_path):
    # Small clips keep the suite fast; the demo test in tests/bot runs the real default size.
    return Settings(data_dir=tmp_path, output_long_side=320, retry_backoff=0.0)


@pytest.fixture
def engine(settings):
    return init_db(settings)


async def _run(engine, settings, params, *, source=SAMPLE, backends=None, deliver_to=None):
    job = create_job(engine, params, source_path=source)
    pipeline = Pipeline(engine, settings, backends=backends)
    try:
        return await pipeline.run(job.id, deliver_to=deliver_to)
    finally:
        await pipeline.aclose()


def _stages(engine, job_id):
    with Session(engine) as s:
        return s.exec(select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.id)).all()


def _attempts(engine, job_id):
    with Session(engine) as s:
        return s.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)).all()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


async def test_local_backend_turns_a_photo_into_a_stored_clip(engine, settings, tmp_path):
    """Every stage runs in order, is timed, and the delivered MP4 starts on the photograph."""
    out = tmp_path / "out.mp4"
    outcome = await _run(engine, settings, JobParams(prompt="slow push-in", duration=2, seed=42), deliver_to=out)

    assert outcome.status == "succeeded", outcome.error
    assert outcome.output == out and out.is_file()
    assert outcome.backend == "local" and outcome.subject == "portrait"
    stages = _stages(engine, outcome.job_id)
    assert [s.stage for s in stages] == list(STAGES)
    assert all(s.seconds >= 0 for s in stages)
    assert {s.outcome for s in stages} <= {"ok", "skipped"}
    with Session(engine) as s:
        job = s.get(Job, outcome.job_id)
        clip = s.exec(select(Clip).where(Clip.job_id == job.id)).one()
    assert job.state == "succeeded" and job.finished_at is not None
    info = video.probe(out)
    assert (info.width, info.height) == (320, 320) == (clip.width, clip.height)
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert info.frames == 48 and abs(info.duration - 2.0) < 0.05
    first = next(video.read_frames(out))
    source = np.asarray(Image.open(SAMPLE).convert("RGB").resize((320, 320), Image.LANCZOS))
    assert _psnr(first, source) > 28


async def test_artifacts_are_named_after_stage_and_parameters(engine, settings):
    """The job folder shows where every file came from."""
    outcome = await _run(engine, settings, JobParams(prompt="p", camera=CameraMove.PAN_LEFT, motion=3,
                                                     duration=1, seed=7))
    folder = settings.media_path / f"job-{outcome.job_id}"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "01-validate-source.png",
        "03-enhance-320x320-crop.png",
        "06-generate-local-pan-left-m3-s7-a1.mp4",
        "09-encode-h264-10MiB.mp4",
    ]


async def test_a_transient_backend_error_is_retried_with_a_new_seed(engine, settings):
    """An outage on attempt 1 is retried; the user only sees the good clip."""
    fake = FakeBackend(settings, outcomes=["fail", "ok"])
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=1, backend="fake", seed=1),
                         backends={"fake": fake})

    assert outcome.status == "succeeded"
    attempts = _attempts(engine, outcome.job_id)
    assert [(a.verdict, a.error_code) for a in attempts] == [("error", "unavailable"), ("accepted", None)]
    assert attempts[0].seed == 1 and attempts[1].seed != 1
    assert attempts[0].handle["backend"] == "fake"


async def test_outputs_that_fail_the_check_are_retried_then_the_job_fails(engine, settings):
    """Three undecodable outputs use up the budget; the job fails with a plain reason."""
    fake = FakeBackend(settings, outcomes=["garbage"] * 3)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=1, backend="fake"),
                         backends={"fake": fake})

    assert outcome.status == "failed"
    assert outcome.error["code"] == "generation_failed"
    assert "no usable clip after 3 attempts" in outcome.error["message"]
    assert "nothing was charged" in outcome.error["message"]
    assert [(a.verdict, a.reasons) for a in _attempts(engine, outcome.job_id)] == [
        ("rejected", ["undecodable"])] * 3
    assert [s.outcome for s in _stages(engine, outcome.job_id) if s.stage == "check"] == ["rejected"] * 3


async def test_a_moderation_refusal_is_not_retried(engine, settings):
    """A permanent error ends the job at once."""
    fake = FakeBackend(settings, outcomes=["refuse", "ok"])
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=1, backend="fake"),
                         backends={"fake": fake})

    assert outcome.status == "failed"
    assert outcome.error["code"] == "content_refused"
    assert len(_attempts(engine, outcome.job_id)) == 1


async def test_a_request_the_backend_cannot_honour_is_refused_before_submitting(engine, settings):
    """A zoom-only backend asked to orbit: the camera is named and nothing is submitted."""
    steady = SteadyFake(settings)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=1, camera=CameraMove.ORBIT_LEFT,
                                                     backend="steady"), backends={"steady": steady})

    assert outcome.status == "rejected"
    assert outcome.error["code"] == "invalid_parameters"
    assert "camera 'orbit-left' is not supported (supported: zoom-in, zoom-out)" in outcome.error["message"]
    assert steady.submitted == []


async def test_an_unknown_backend_is_refused_with_the_installed_ones(engine, settings):
    """A typo in --backend lists what exists."""
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=1, backend="lcoal"))
    assert outcome.status == "rejected"
    assert "unknown backend 'lcoal'" in outcome.error["message"] and "local" in outcome.error["message"]


async def test_a_refused_image_fails_the_job_at_validation(engine, settings, tmp_path):
    """A non-image is rejected with its reason; nothing after validation runs."""
    bogus = tmp_path / "notes.png"
    bogus.write_text("these are my notes, not a picture")
    outcome = await _run(engine, settings, JobParams(prompt="p"), source=bogus)

    assert outcome.status == "rejected"
    assert outcome.error["code"] != "invalid_input"
    stages = _stages(engine, outcome.job_id)
    assert [(s.stage, s.outcome) for s in stages] == [("validate", "failed")]
    with Session(engine) as s:
        job = s.get(Job, outcome.job_id)
    assert job.state == "failed" and job.error_code == outcome.error["code"]


async def test_the_final_encode_fits_a_small_byte_limit(tmp_path):
    """With a 150 KiB limit the clip is re-encoded under a VBV cap and still fits."""
    settings = Settings(data_dir=tmp_path, output_long_side=640, max_clip_bytes=150 * 1024)
    engine = init_db(settings)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=3, motion=4))

    assert outcome.status == "succeeded", outcome.error
    encode_stage = next(s for s in _stages(engine, outcome.job_id) if s.stage == "encode")
    assert encode_stage.detail["method"] == "capped-crf"
    assert 0 < outcome.clip["bytes"] <= 150 * 1024


def _member_with(engine, credits: int) -> int:
    with Session(engine) as s:
        account = ledger.member_account(s, "guild-1", "user-1")
        if credits:
            ledger.grant(s, account.id, credits, key="welcome")
        return account.id


def _balance(engine, account_id):
    with Session(engine) as s:
        return ledger.balance(s, account_id)


async def _run_charged(engine, settings, account_id, fake, duration=3):
    job = create_job(engine, JobParams(prompt="p", duration=duration, backend="fake"), source_path=SAMPLE,
                     account_id=account_id, key="interaction-1")
    pipeline = Pipeline(engine, settings, backends={"fake": fake})
    return job, await pipeline.run(job.id)


async def test_a_member_pays_for_a_delivered_clip(engine, settings):
    """Submitting holds the price; success captures exactly that much."""
    member = _member_with(engine, 10)
    job, outcome = await _run_charged(engine, settings, member, FakeBackend(settings))

    assert outcome.status == "succeeded"
    assert outcome.cost["credits"] == job.price_credits == 3
    assert (_balance(engine, member).available, _balance(engine, member).held) == (7, 0)
    with Session(engine) as s:
        assert ledger.audit(s) == []


async def test_a_failed_job_gives_the_credits_back(engine, settings):
    """Failure after every retry voids the reservation: the member keeps every credit."""
    member = _member_with(engine, 10)
    _, outcome = await _run_charged(engine, settings, member, FakeBackend(settings, outcomes=["garbage"] * 3))

    assert outcome.status == "failed"
    assert (_balance(engine, member).available, _balance(engine, member).held) == (10, 0)
    with Session(engine) as s:
        assert ledger.audit(s) == []


async def test_a_job_the_member_cannot_afford_is_refused_with_balance_and_price(engine, settings):
    """Not enough credits: no job, no charge, and the message says both numbers."""
    member = _member_with(engine, 2)
    with pytest.raises(InsufficientCredits, match="this costs 3 credits but you have 2"):
        create_job(engine, JobParams(prompt="p", duration=3, backend="fake"), source_path=SAMPLE,
                   account_id=member)
    with Session(engine) as s:
        assert s.exec(select(Job)).all() == []
    assert _balance(engine, member).available == 2


def test_submitting_the_same_key_twice_returns_the_same_job_and_charges_once(engine):
    """The idempotency key (the chat interaction id) makes a resubmit harmless."""
    member = _member_with(engine, 10)
    params = JobParams(prompt="p", duration=3, backend="fake")
    first = create_job(engine, params, source_path=SAMPLE, account_id=member, key="interaction-9")
    second = create_job(engine, params, source_path=SAMPLE, account_id=member, key="interaction-9")

    assert first.id == second.id
    assert (_balance(engine, member).available, _balance(engine, member).held) == (7, 3)



def _guild_routes(engine, guild_id: str, overrides: dict) -> None:
    with Session(engine) as s:
        s.add(GuildSettings(guild_id=guild_id, routing_overrides=overrides))
        s.commit()


async def test_a_portrait_is_seen_framed_on_the_face_and_prompted_for_faces(engine, settings):
    """The astronaut is a portrait: faces found, the crop keeps the face, the prompt asks for blinks."""
    outcome = await _run(engine, settings, JobParams(prompt="she smiles", duration=1, aspect="16:9"))

    assert outcome.status == "succeeded", outcome.error
    assert outcome.subject == "portrait"
    stages = {s.stage: s.detail for s in _stages(engine, outcome.job_id)}
    assert stages["classify"]["kind"] == "portrait" and stages["classify"]["faces"]
    fx, fy = stages["enhance"]["focus"]["x"], stages["enhance"]["focus"]["y"]
    assert 0 <= fx < 320 and 0 <= fy < 180, "the face is inside the 16:9 frame"
    assert "natural blink" in stages["prompt"]["prompt"]
    skipped = {s["backend"]: s["why"] for s in stages["route"]["skipped"]}
    assert "replicate" in skipped and "fal" in skipped


async def test_a_backend_that_refuses_the_request_falls_back_along_the_route(engine, settings):
    """A permanent error on the first backend moves the job to the next one on its route."""
    _guild_routes(engine, "g1", {"portrait": [{"backend": "fake", "reason": "ours"}]})
    job = create_job(engine, JobParams(prompt="p", duration=1), source_path=SAMPLE, guild_id="g1")
    pipeline = Pipeline(engine, settings, backends={"fake": FakeBackend(settings, outcomes=["invalid"])})
    outcome = await pipeline.run(job.id)

    assert outcome.status == "succeeded", outcome.error
    assert [(a["backend"], a["verdict"]) for a in outcome.attempts] == [("fake", "error"), ("local", "accepted")]
    assert outcome.backend == "local"


@pytest.mark.parametrize(("defect", "reason"), [("flicker", "flicker"), ("black", "black_frames"),
                                                  ("frozen", "frozen"), ("drift", "drift")])
async def test_a_defective_clip_is_rejected_and_silently_retried(engine, settings, defect, reason):
    """Each defect the gate catches costs one attempt; the user gets the good second clip."""
    fake = FakeBackend(settings, outcomes=[defect, "ok"])
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=2, backend="fake", motion=3),
                         backends={"fake": fake})

    assert outcome.status == "succeeded", outcome.error
    first, second = _attempts(engine, outcome.job_id)
    assert first.verdict == "rejected" and reason in first.reasons
    assert second.verdict == "accepted"
    assert second.motion == (2 if reason == "drift" else 3), "drift lowers the motion strength"


async def test_a_job_that_keeps_failing_the_gate_tells_the_user_why(engine, settings):
    """After the budget the job fails with the gate's reason in plain words, and no charge."""
    fake = FakeBackend(settings, outcomes=["flicker"] * 5)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=2, backend="fake"),
                         backends={"fake": fake})

    assert outcome.status == "failed"
    assert "no usable clip after 3 attempts" in outcome.error["message"]
    assert quality.REASON_TEXT["flicker"] in outcome.error["message"]


async def test_best_of_n_keeps_the_candidate_the_gate_scores_best(tmp_path):
    """With best_of=2 two accepted clips are made and the better-scored one is delivered."""
    settings = Settings(data_dir=tmp_path, output_long_side=320, retry_backoff=0.0, best_of=2)
    engine = init_db(settings)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=1, backend="fake"),
                         backends={"fake": FakeBackend(settings)})

    assert outcome.status == "succeeded"
    verdicts = sorted(a["verdict"] for a in outcome.attempts)
    assert verdicts == ["accepted", "runner-up"]


class SteadyFake(FakeBackend):
    """A backend that only zooms."""

    name = "steady"
    description = "zoom only"
    capabilities = dataclasses.replace(
        FakeBackend.capabilities, cameras=frozenset({CameraMove.ZOOM_IN, CameraMove.ZOOM_OUT})
    )


class ShortFake(FakeBackend):
    """A backend limited to 5 s, like many hosted models."""

    name = "short-fake"
    description = "at most 5 s per generation"
    capabilities = dataclasses.replace(FakeBackend.capabilities, durations=(1.0, 5.0))


async def test_a_clip_longer_than_the_backend_allows_is_built_from_segments(engine, settings):
    """12 s on a 5 s backend: three segments, each continuing the last frame, cross-faded into one clip."""
    short = ShortFake(settings)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=12, backend="short-fake"),
                         backends={"short-fake": short})

    assert outcome.status == "succeeded", outcome.error
    assert len(short.submitted) == 3
    assert all(r.duration <= 5.0 for r in short.submitted)
    assert short.submitted[0].image_path.name.startswith("03-enhance")
    assert [r.image_path.name for r in short.submitted[1:]] == [
        "06-generate-lastframe-seg1.png", "06-generate-lastframe-seg2.png"]
    info = video.probe(outcome.output)
    assert abs(info.duration - 12.0) <= 0.1 and round(info.fps) == 24
    post = next(s for s in _stages(engine, outcome.job_id) if s.stage == "post-process")
    assert post.detail["stitch"]["segments"] == 3 and post.detail["verdict"]["accepted"]


async def test_a_rejected_segment_is_retried_on_its_own(engine, settings):
    """A flickering second segment is regenerated; the first one is kept."""
    short = ShortFake(settings, outcomes=["ok", "flicker", "ok"])
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=8, backend="short-fake"),
                         backends={"short-fake": short})

    assert outcome.status == "succeeded", outcome.error
    assert [a["verdict"] for a in outcome.attempts] == ["accepted", "rejected", "accepted"]
    assert short.submitted[1].image_path == short.submitted[2].image_path


class EightFpsFake(FakeBackend):
    """A model that renders 8 frames a second, like CogVideoX."""

    name = "eight-fps"
    description = "8 fps output"
    capabilities = dataclasses.replace(FakeBackend.capabilities, fps=8)


@pytest.mark.parametrize("mode", ["motion", "blend"])
async def test_a_low_frame_rate_clip_is_interpolated_to_24_fps_and_judged_again(tmp_path, mode):
    """8 fps output becomes exactly 24 fps × duration frames; the gate accepts the interpolated clip."""
    settings = Settings(data_dir=tmp_path, output_long_side=320, retry_backoff=0.0, interpolation=mode)
    engine = init_db(settings)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=2, backend="eight-fps"),
                         backends={"eight-fps": EightFpsFake(settings)})

    assert outcome.status == "succeeded", outcome.error
    info = video.probe(outcome.output)
    assert info.frames == 48 and round(info.fps) == 24
    post = next(s for s in _stages(engine, outcome.job_id) if s.stage == "post-process")
    assert post.detail["interpolate"]["mode"] == mode and post.detail["verdict"]["accepted"]


@pytest.mark.parametrize("camera", [CameraMove.STATIC, CameraMove.ZOOM_IN, CameraMove.PAN_LEFT])
async def test_long_local_clips_keep_moving_and_pass_the_gate(tmp_path, camera):
    """A 20 s clip cruises at a steady speed instead of crawling (which the gate would call frozen)."""
    settings = Settings(data_dir=tmp_path, output_long_side=256, retry_backoff=0.0)
    engine = init_db(settings)
    outcome = await _run(engine, settings, JobParams(prompt="p", duration=20, camera=camera, aspect="16:9"))

    assert outcome.status == "succeeded", outcome.error
    assert [a["verdict"] for a in outcome.attempts] == ["accepted"]


# -- prompt-only jobs and end frames ------------------------------------------------------------------


def _kinds(engine, job_id):
    from worker import events

    return [e.kind for e in events.history(engine, job_id)]


async def test_a_prompt_only_job_paints_its_picture_first_then_runs_every_stage(engine, settings):
    """The still is painted (its own stage and event), becomes the job's source, and is animated like an upload."""
    painting = settings.model_copy(update={"text_to_image": "fake"})
    fake = FakeBackend(painting)
    job = create_job(engine, JobParams(prompt="a lighthouse at dusk", duration=2, seed=5, backend="fake"),
                     detail={"paint": {"backend": "fake", "model": "still", "credits": 1}})
    pipeline = Pipeline(engine, painting, backends={"fake": fake})
    outcome = await pipeline.run(job.id)

    assert outcome.status == "succeeded", outcome.error
    assert [s.stage for s in _stages(engine, job.id)] == ["paint", *STAGES]
    [painted] = fake.painted
    assert (painted.prompt, painted.seed, painted.width, painted.height) == ("a lighthouse at dusk", 5, 512, 288)
    assert painted.output_path.name == "00-paint-fake-still-s5-t1.png"
    with Session(engine) as s:
        row = s.get(Job, job.id)
    assert Path(row.source_path).name == "01-validate-source.png"
    assert Path(row.source_path).read_bytes() == painted.output_path.read_bytes()
    assert fake.submitted[0].image_path.name.startswith("03-enhance-320x180")  # auto: painted 16:9
    assert _kinds(engine, job.id)[:3] == ["started", "painting", "generating"]


async def test_a_painting_outage_is_retried_and_a_refusal_ends_the_job(engine, settings):
    """A transient error paints again after the backoff; the painter's moderation refusal fails the job at once."""
    outage = create_job(engine, JobParams(prompt="p", duration=1, backend="fake"),
                        detail={"paint": {"backend": "fake", "model": "fail,ok", "credits": 0}})
    refused = create_job(engine, JobParams(prompt="p", duration=1, backend="fake"),
                         detail={"paint": {"backend": "fake", "model": "refuse", "credits": 0}})
    pipeline = Pipeline(engine, settings, backends={"fake": FakeBackend(settings)})
    retried, ended = await pipeline.run(outage.id), await pipeline.run(refused.id)

    assert retried.status == "succeeded", retried.error
    assert [(s.stage, s.outcome) for s in _stages(engine, outage.id)][:3] == [
        ("paint", "failed"), ("paint", "ok"), ("validate", "ok")]
    assert "retrying" in _kinds(engine, outage.id)
    assert (ended.status, ended.error["code"]) == ("failed", "content_refused")
    assert ended.error["message"].startswith("the model refused this picture or prompt")
    assert [s.stage for s in _stages(engine, refused.id)] == ["paint"]


async def test_a_painting_that_keeps_failing_fails_the_job_and_refunds_it(engine, settings):
    """After max_attempts tries the member is told, and the still and the clip are both given back."""
    member = _member_with(engine, 10)
    job = create_job(engine, JobParams(prompt="p", duration=3, backend="fake"), account_id=member, price=4,
                     detail={"paint": {"backend": "fake", "model": "fail", "credits": 1}})
    outcome = await Pipeline(engine, settings, backends={"fake": FakeBackend(settings)}).run(job.id)

    assert (outcome.status, outcome.error["code"]) == ("failed", "paint_failed")
    assert "could not paint a picture from the prompt" in outcome.error["message"]
    assert len([s for s in _stages(engine, job.id) if s.stage == "paint"]) == settings.max_attempts
    assert (_balance(engine, member).available, _balance(engine, member).held) == (10, 0)


async def test_a_painted_job_is_charged_the_clip_and_the_still(engine, settings):
    """Success captures the clip's price plus the still's, exactly what was held."""
    member = _member_with(engine, 10)
    job = create_job(engine, JobParams(prompt="p", duration=3, backend="fake"), account_id=member, price=4,
                     detail={"paint": {"backend": "fake", "model": "still", "credits": 1}})
    outcome = await Pipeline(engine, settings, backends={"fake": FakeBackend(settings)}).run(job.id)

    assert outcome.status == "succeeded" and outcome.cost["credits"] == 4
    assert (_balance(engine, member).available, _balance(engine, member).held) == (6, 0)


async def test_an_end_frame_is_fitted_like_the_picture_and_sent_with_the_last_segment(engine, settings, tmp_path):
    """The end frame is validated, kept, fitted to the clip's size; only the segment that ends the clip gets it."""
    end = tmp_path / "end.png"
    Image.new("RGB", (900, 300), (30, 160, 90)).save(end)
    short = ShortFake(settings)
    job = create_job(engine, JobParams(prompt="p", duration=8, aspect="16:9", backend="short-fake"),
                     source_path=SAMPLE, detail={"end_frame": {"path": str(end)}})
    outcome = await Pipeline(engine, settings, backends={"short-fake": short}).run(job.id)

    assert outcome.status == "succeeded", outcome.error
    first, last = short.submitted
    assert first.end_image_path is None
    assert last.end_image_path.name == "03-enhance-end-320x180-crop.png"
    with Image.open(last.end_image_path) as im:
        assert im.size == (320, 180) == (last.width, last.height)
    with Session(engine) as s:
        kept = Path(s.get(Job, job.id).detail["end_frame"]["path"])
    assert kept.name == "01-validate-end.png" and kept.read_bytes() == end.read_bytes()


async def test_an_end_frame_that_is_not_a_picture_is_refused_at_validation(engine, settings, tmp_path):
    """Decoding it fails like a bad upload: the job is rejected, saying it is the end frame."""
    end = tmp_path / "end.png"
    end.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    job = create_job(engine, JobParams(prompt="p", duration=1, backend="fake"), source_path=SAMPLE,
                     detail={"end_frame": {"path": str(end)}})
    outcome = await Pipeline(engine, settings, backends={"fake": FakeBackend(settings)}).run(job.id)
    assert outcome.status == "rejected" and outcome.error["message"].startswith("the end frame cannot be used")


async def test_an_end_frame_routes_past_backends_that_cannot_honour_it(engine, settings, tmp_path):
    """local cannot end on a given frame: with only local on the route the job is rejected, naming why."""
    end = tmp_path / "end.png"
    Image.new("RGB", (320, 180), (30, 160, 90)).save(end)
    job = create_job(engine, JobParams(prompt="p", duration=1), source_path=SAMPLE,
                     detail={"end_frame": {"path": str(end)}})
    outcome = await Pipeline(engine, settings).run(job.id)
    assert outcome.status == "rejected"
    assert "nothing here can end a clip on a given frame" in outcome.error["message"]
    route = next(s for s in _stages(engine, job.id) if s.stage == "route")
    assert route.outcome == "failed"
