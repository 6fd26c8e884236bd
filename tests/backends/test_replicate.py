"""The replicate backend against the Replicate emulator, through the real ``replicate`` client."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from unittest.mock import ANY

import httpx
import numpy as np
import pytest
import replicate
from aiohttp import web
from emulators.replicate_api import Outcome, ReplicateEmulator
from PIL import Image
from replicate.helpers import FileOutput

from backends import video
from backends.base import (
    Aspect,
    BackendTimeout,
    BackendUnavailable,
    CameraMove,
    ContentRefused,
    GenerationRequest,
    Handle,
    ImageRequest,
    InvalidRequest,
    PermanentBackendError,
    RateLimited,
    State,
    StatusReport,
    UnsupportedRequest,
    WebhookNotice,
    WebhookRejected,
)
from backends.replicate import (
    CATALOGUE,
    Catalogue,
    CatalogueError,
    ReplicateBackend,
    host_allowed,
    load_catalogue,
)
from worker.settings import Settings


@pytest.fixture
async def emu() -> AsyncIterator[ReplicateEmulator]:
    async with ReplicateEmulator(start_delay=0.02, latency=0.1) as emulator:
        yield emulator


def make_settings(emu: ReplicateEmulator, tmp_path: Path, **overrides) -> Settings:
    values = {"data_dir": tmp_path, "replicate_api_token": emu.token, "replicate_base_url": emu.base_url,
              "provider_download_hosts": ["127.0.0.1"], **overrides}
    return Settings(**values)


@pytest.fixture
async def backend(emu, tmp_path) -> AsyncIterator[ReplicateBackend]:
    b = ReplicateBackend(make_settings(emu, tmp_path))
    yield b
    await b.aclose()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A small 16:9 photo-like PNG (inlined as a data: URI, being under 256 KB)."""
    ys, xs = np.mgrid[0:360, 0:640]
    rgb = np.dstack([xs * 255 // 640, ys * 255 // 360, (xs + ys) % 256]).astype(np.uint8)
    path = tmp_path_factory.mktemp("src") / "cat.png"
    Image.fromarray(rgb).save(path)
    return path


def req(picture: Path, tmp_path: Path, **kw) -> GenerationRequest:
    kw.setdefault("prompt", "the cat blinks, slow zoom in")
    kw.setdefault("output_name", "clip.mp4")
    return GenerationRequest(image_path=picture, output_dir=tmp_path / "out", **kw)


async def finish(backend: ReplicateBackend, handle: Handle, timeout: float = 10.0) -> tuple[StatusReport, list]:
    """Poll until terminal; the last report and every report seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        report = await backend.status(handle)
        seen.append(report)
        if report.state.terminal:
            return report, seen
        assert time.monotonic() < deadline, f"still {report.state} after {timeout} s"
        await asyncio.sleep(0.02)


# -- the happy path ---------------------------------------------------------------------------------


async def test_submit_poll_result_makes_a_real_mp4(backend, emu, picture, tmp_path):
    """Kling by default: inputs mapped from the catalogue, queued → running with progress → a playable clip."""
    emu.start_delay, emu.latency = 0.3, 0.4
    request = req(picture, tmp_path, negative_prompt="blur", seed=7)
    handle = await backend.submit(request)

    [create] = emu.creates
    assert create.path == "/v1/models/kwaivgi/kling-v2.1/predictions"
    assert create.json["input"]["start_image"].startswith("data:image/png;base64,")
    assert {k: v for k, v in create.json["input"].items() if k != "start_image"} == {
        "prompt": "the cat blinks, slow zoom in", "negative_prompt": "blur", "duration": 5, "mode": "standard"}
    assert "webhook" not in create.json
    report, seen = await finish(backend, handle)
    assert report.state is State.SUCCEEDED
    assert seen[0].state is State.QUEUED
    assert any(r.state is State.RUNNING and r.progress is not None and 0 <= r.progress < 1 for r in seen)

    result = await backend.result(handle)
    assert result.video_path == tmp_path / "out" / "clip.mp4"
    info = video.probe(result.video_path)
    assert (result.width, result.height, result.frames) == (info.width, info.height, info.frames) == (256, 144, 24)
    assert result.cost_usd == pytest.approx(0.05 * 5)  # Kling standard, 5 s
    assert result.metadata["ignored"] == ["seed"]
    assert not list((tmp_path / "out").glob(".*part*")), "no temporary file left behind"


async def test_a_handle_resumes_in_a_new_process(emu, picture, tmp_path):
    """A handle stored as JSON is enough for another backend instance to poll and collect the result."""
    first = ReplicateBackend(make_settings(emu, tmp_path))
    stored = (await first.submit(req(picture, tmp_path))).to_json()
    await first.aclose()

    second = ReplicateBackend(make_settings(emu, tmp_path))
    handle = Handle.from_json(stored)
    assert (await finish(second, handle))[0].state is State.SUCCEEDED
    assert (await second.result(handle)).frames == 24
    await second.aclose()


async def test_a_large_picture_is_uploaded_through_the_files_api(backend, emu, tmp_path):
    """Above 256 KB the start image goes through POST /v1/files and the prediction gets its URL."""
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 640, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 256 * 1024
    handle = await backend.submit(req(big, tmp_path))

    [upload] = [c for c in emu.calls if c.path == "/v1/files"]
    assert upload.status == 201
    [create] = emu.creates
    [file_id] = emu.files
    assert create.json["input"]["start_image"] == f"{emu.base_url}/v1/files/{file_id}"
    assert (await finish(backend, handle))[0].state is State.SUCCEEDED


@pytest.mark.parametrize("model, duration, sent", [
    ("wan-video/wan-2.2-i2v-a14b", 6.0, {"num_frames": 97, "frames_per_second": 16, "seed": 0, "resolution": "720p"}),
    ("minimax/hailuo-02", 6.0, {"duration": 6, "resolution": "768p"}),
    ("luma/ray-flash-2-540p", 9.0, {"duration": 9, "aspect_ratio": "16:9", "concepts": ["zoom_in"], "loop": False}),
    ("stability-ai/stable-video-diffusion", 4.0,
     {"video_length": "25_frames_with_svd_xt", "frames_per_second": 6, "motion_bucket_id": 127}),
    ("lightricks/ltx-video", 4.0, {"length": 97, "aspect_ratio": "16:9", "cfg": 3, "steps": 30}),
])
async def test_every_catalogue_model_is_accepted_by_the_api(backend, emu, picture, tmp_path, model, duration, sent):
    """Each model's parameters are mapped from the catalogue into inputs the API validates and runs."""
    camera = CameraMove.STATIC if model.startswith("stability-ai") else CameraMove.ZOOM_IN
    handle = await backend.submit(req(picture, tmp_path, model=model, duration=duration, camera=camera))

    [create] = emu.creates
    official = not model.startswith(("stability-ai", "lightricks"))
    assert create.path == (f"/v1/models/{model}/predictions" if official else "/v1/predictions")
    assert create.json["input"].items() >= sent.items()
    assert (await finish(backend, handle))[0].state is State.SUCCEEDED
    result = await backend.result(handle)  # LTX answers a list: its first item is the clip
    assert result.frames == 24 and result.video_path.is_file()
    if not official:
        assert result.cost_usd == pytest.approx(CATALOGUE.models[model].gpu_price_per_second * 0.1, rel=0.05)


async def test_the_webhook_url_is_passed_for_completed_events_only(backend, emu, picture, tmp_path):
    """With ``webhook_url`` the prediction reports to it when it completes."""
    await backend.submit(req(picture, tmp_path, webhook_url="https://bot.example/webhooks/replicate"))
    [create] = emu.creates
    assert create.json["webhook"] == "https://bot.example/webhooks/replicate"
    assert create.json["webhook_events_filter"] == ["completed"]


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, changes, expected", [
    (None, {"duration": 7.0}, "kwaivgi/kling-v2.1 cannot make a 7 s clip (duration must be 5 or 10 s)"),
    ("minimax/hailuo-02", {"duration": 5.0}, "minimax/hailuo-02 cannot make a 5 s clip (duration must be 6 or 10 s)"),
    ("wan-video/wan-2.2-i2v-a14b", {"duration": 9.0}, "duration must be 5-7.5 s (81-121 frames at 16 fps)"),
    ("lightricks/ltx-video", {"duration": 5.0}, "duration must be 4, 5.3, 6.7, 8, 9.3 or 10.7 s"),
    ("stability-ai/stable-video-diffusion", {"duration": 4.0, "aspect": Aspect.SQUARE},
     "stability-ai/stable-video-diffusion makes 16:9 or 9:16 clips, not aspect 1:1"),
    ("stability-ai/stable-video-diffusion", {"duration": 4.0, "camera": CameraMove.ORBIT_LEFT},
     "cannot follow camera 'orbit-left' (it takes no prompt; supported: static)"),
    ("someone/unknown-model", {}, "model 'someone/unknown-model' is not in the replicate catalogue"),
    ("black-forest-labs/flux-schnell", {}, "black-forest-labs/flux-schnell is a image model, not an image-to-video"),
])
async def test_what_a_model_cannot_do_is_refused_by_name_before_any_call(
    backend, emu, picture, tmp_path, model, changes, expected
):
    """The refusal names the model and what it can do, and nothing reaches Replicate."""
    request = req(picture, tmp_path, model=model, **changes)
    assert any(expected in r for r in backend.refusals(request))
    assert any(expected in r for r in ReplicateBackend.capabilities.refusals(request))  # what routing asks

    with pytest.raises(UnsupportedRequest, match=r"cannot|not") as caught:
        await backend.submit(request)
    assert expected in caught.value.message
    assert emu.calls == []


async def test_an_end_frame_is_refused_by_name_where_the_model_takes_none(backend, emu, picture, tmp_path):
    """Hailuo has no end-image field: refused before any call, naming the models that can."""
    request = req(picture, tmp_path, model="minimax/hailuo-02", duration=6.0, end_image_path=picture)
    expected = ("minimax/hailuo-02 cannot end on a given frame "
                "(models that can: kwaivgi/kling-v2.1, luma/ray-flash-2-540p)")
    assert CATALOGUE.refusals(request) == [expected]
    assert ReplicateBackend.capabilities.refusals(request) == [expected]  # what routing asks
    with pytest.raises(UnsupportedRequest, match="cannot end on a given frame"):
        await backend.submit(request)
    assert emu.calls == []


async def test_an_end_frame_reaches_klings_end_image_in_pro_mode(backend, emu, picture, tmp_path):
    """Kling takes the end frame in its pro mode, at its pro price; the API receives both pictures."""
    ys, xs = np.mgrid[0:360, 0:640]
    end = tmp_path / "end.png"
    Image.fromarray(np.dstack([ys * 255 // 360, xs * 255 // 640, (xs * ys) % 256]).astype(np.uint8)).save(end)
    handle = await backend.submit(req(picture, tmp_path, end_image_path=end))

    [create] = emu.creates
    sent = create.json["input"]
    assert sent["start_image"] == "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    assert sent["end_image"] == "data:image/png;base64," + base64.b64encode(end.read_bytes()).decode()
    assert sent["mode"] == "pro"
    assert (await finish(backend, handle))[0].state is State.SUCCEEDED
    assert (await backend.result(handle)).cost_usd == pytest.approx(0.09 * 5)
    assert ReplicateBackend.end_frame_models() == ["replicate:kwaivgi/kling-v2.1", "replicate:luma/ray-flash-2-540p"]


def test_capabilities_are_the_union_of_the_catalogue(tmp_path):
    """Class capabilities span every model; usability names the token setting; long clips are refused."""
    caps = ReplicateBackend.capabilities
    assert caps.durations == (2.33, 10.67)
    assert caps.aspects == frozenset(Aspect) and caps.cameras == frozenset(CameraMove)
    assert caps.needs_network and caps.settings == ("replicate_api_token",)
    assert caps.cost_per_second_usd == 0.05
    assert {"portrait", "landscape", "product"} <= caps.good_at
    assert ReplicateBackend.check_usable(Settings(data_dir=tmp_path)).reason == "set ANIMABOT_REPLICATE_API_TOKEN"
    too_long = GenerationRequest(image_path=tmp_path / "x.png", prompt="p", output_dir=tmp_path, duration=11.67)
    assert any("duration" in r for r in ReplicateBackend(Settings(data_dir=tmp_path)).refusals(too_long))
    assert ReplicateBackend(Settings(data_dir=tmp_path)).allowed_durations("luma/ray-flash-2-540p") == [5.0, 9.0]


@pytest.mark.parametrize("text, problem", [
    ('default = "a/b"\n[models."a/b"]\nlabel = "x"\nkind = "video"\nofficial = true\nbogus = 1\n', "unknown keys"),
    ('default = "a/b"\n[models."a/b"]\nlabel = "x"\nkind = "video"\nofficial = false\nstart_image = "i"\n'
     'duration_field = "d"\ndurations = [5]\naspects = ["16:9"]\n', "64-hex version"),
    ('default = "a/b"\n[models."a/b"]\nlabel = "x"\nkind = "video"\nofficial = true\nstart_image = "i"\n'
     'duration_field = "d"\ndurations = [5]\naspects = ["5:4"]\n', "'5:4' is not a valid Aspect"),
    ('default = "c/d"\n', "default 'c/d' is not an image-to-video model"),
])
def test_a_malformed_catalogue_says_what_is_wrong(tmp_path, text, problem):
    """Catalogue mistakes fail at load (so at import), naming the model and the problem."""
    path = tmp_path / "replicate.toml"
    path.write_text(text)
    with pytest.raises(CatalogueError, match=r"replicate\.toml") as caught:
        load_catalogue(path)
    assert problem in str(caught.value)


# -- stills (text-to-image) ------------------------------------------------------------------------


def still(tmp_path: Path, **kw) -> ImageRequest:
    kw.setdefault("prompt", "a lighthouse at dusk")
    return ImageRequest(output_path=tmp_path / "still" / "picture.png", **kw)


async def test_imagine_paints_a_still_with_flux_schnell_and_waits_for_it(backend, emu, tmp_path):
    """FLUX.1 [schnell] is the default: one create held with Prefer: wait, the picture written as PNG."""
    result = await backend.imagine(still(tmp_path, aspect=Aspect.PORTRAIT, seed=11, negative_prompt="blur"))

    [create] = emu.creates
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert create.headers["Prefer"] == "wait=60"
    assert create.json["input"] == {"prompt": "a lighthouse at dusk", "seed": 11, "aspect_ratio": "9:16",
                                    "num_outputs": 1, "output_format": "png"}  # flux takes no negative prompt
    assert [c.method for c in emu.calls] == ["POST"]  # the held create answered with the picture
    with Image.open(result.image_path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (288, 512))
    assert (result.width, result.height, result.cost_usd) == (288, 512, 0.003)
    assert result.metadata["model"] == "black-forest-labs/flux-schnell"
    assert ReplicateBackend.image_models == ("black-forest-labs/flux-schnell",)


@pytest.mark.parametrize("outcome, output_format", [("ok", "webp"), ("ok", "jpg"), ("url", "webp")])
async def test_a_still_in_any_format_or_at_a_url_is_written_as_png(emu, tmp_path, monkeypatch, outcome,
                                                                    output_format):
    """WebP and JPEG outputs, inline or downloaded from an allowed host, all end up as the same PNG."""
    entry = CATALOGUE.models["black-forest-labs/flux-schnell"]
    formats = dataclasses.replace(entry, inputs={**entry.inputs, "output_format": output_format})
    catalogue = dataclasses.replace(CATALOGUE, models={**CATALOGUE.models, entry.id: formats})
    backend = ReplicateBackend(make_settings(emu, tmp_path), catalogue=catalogue)
    emu.script(outcome)
    try:
        result = await backend.imagine(still(tmp_path))
    finally:
        await backend.aclose()
    with Image.open(result.image_path) as im:
        assert (im.format, im.size) == ("PNG", (512, 288))
    if outcome == "url":
        assert any(c.path.startswith("/delivery/") for c in emu.calls)


@pytest.mark.parametrize("outcome, kind, words", [
    ("refuse", ContentRefused, "flagged as sensitive"),
    ("fail", BackendUnavailable, "out of memory"),
    ("garbage", BackendUnavailable, "not a picture"),
    ("null", BackendUnavailable, "no output"),
])
async def test_a_failed_still_raises_its_classified_error(backend, emu, tmp_path, outcome, kind, words):
    """What went wrong is classified as for clips: moderation is permanent, an outage or bad output transient."""
    emu.script(outcome)
    with pytest.raises(kind, match=words):
        await backend.imagine(still(tmp_path))
    assert not (tmp_path / "still" / "picture.png").exists()


async def test_a_still_that_takes_too_long_is_canceled_and_times_out(backend, emu, tmp_path):
    """Past still_timeout the prediction is canceled at Replicate and the error is a (transient) timeout."""
    backend.still_timeout = 0.3
    emu.script("hang")
    with pytest.raises(BackendTimeout, match="made no picture"):
        await backend.imagine(still(tmp_path))
    [prediction] = emu.predictions.values()
    assert prediction.canceled_at is not None


async def test_only_text_to_image_models_paint(backend, emu, tmp_path):
    """A video model named as the painter is refused by name; nothing reaches Replicate."""
    with pytest.raises(UnsupportedRequest, match=r"'kwaivgi/kling-v2\.1' is not a text-to-image model"):
        await backend.imagine(still(tmp_path, model="kwaivgi/kling-v2.1"))
    assert emu.calls == []


# -- failures and faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("outcome, kind, words", [
    ("refuse", ContentRefused, "flagged as sensitive"),
    ("fail", BackendUnavailable, "CUDA out of memory"),
    ("invalid", InvalidRequest, "image is too small"),
])
async def test_a_failed_prediction_carries_its_classified_error(backend, emu, picture, tmp_path, outcome, kind, words):
    """Moderation wording → ContentRefused, invalid input → InvalidRequest, anything else → outage."""
    emu.script(outcome)
    report, _ = await finish(backend, await backend.submit(req(picture, tmp_path)))
    assert report.state is State.FAILED
    assert type(report.error) is kind and words in report.error.message


@pytest.mark.parametrize("header, detail, retry_after", [(True, False, 7.0), (False, True, 7.0), (False, False, 5.0)])
async def test_a_429_on_create_is_rate_limited_with_retry_after(
    backend, emu, picture, tmp_path, header, detail, retry_after
):
    """429 → RateLimited; retry_after from Retry-After, else the body's "available in N seconds", else 5 s."""
    emu.throttle(retry_after=7, header=header, detail=detail)
    with pytest.raises(RateLimited) as caught:
        await backend.submit(req(picture, tmp_path))
    assert caught.value.retry_after == retry_after and caught.value.transient
    assert len(emu.creates) == 1, "the client never retries a create; the job system does"


@pytest.mark.parametrize("status, on, kind", [
    (503, "create", BackendUnavailable),
    (500, "create", BackendUnavailable),
    (0, "create", BackendUnavailable),  # connection dropped
    (500, "get", BackendUnavailable),
])
async def test_server_errors_are_transient(backend, emu, picture, tmp_path, status, on, kind):
    """5xx and dropped connections are outages (transient)."""
    if on == "create":
        emu.fail_next(status=status, on="create")
        with pytest.raises(kind):
            await backend.submit(req(picture, tmp_path))
    else:
        handle = await backend.submit(req(picture, tmp_path))
        emu.fail_next(status=status, on="get")
        with pytest.raises(kind):
            await backend.status(handle)


async def test_a_503_on_a_poll_is_absorbed_by_the_clients_own_get_retry(backend, emu, picture, tmp_path):
    """The client retries GETs on 503 itself (documented); the backend adds no loop of its own."""
    handle = await backend.submit(req(picture, tmp_path))
    emu.fail_next(status=503, on="get")
    mark = emu.mark()
    await backend.status(handle)
    assert [c.status for c in emu.calls_since(mark)] == [503, 200]


async def test_a_bad_token_tells_the_owner_which_setting_to_check(emu, picture, tmp_path):
    """401 is permanent and names ANIMABOT_REPLICATE_API_TOKEN."""
    b = ReplicateBackend(make_settings(emu, tmp_path, replicate_api_token="r8_wrong"))
    with pytest.raises(PermanentBackendError, match="ANIMABOT_REPLICATE_API_TOKEN") as caught:
        await b.submit(req(picture, tmp_path))
    assert not caught.value.transient
    await b.aclose()


async def test_unknown_model_and_rejected_input_are_invalid_requests(emu, picture, tmp_path):
    """404 for a model Replicate does not have, 422 for input it rejects: InvalidRequest."""
    kling = CATALOGUE.models["kwaivgi/kling-v2.1"]
    models = {
        "someone/gone": dataclasses.replace(kling, id="someone/gone"),
        "kwaivgi/kling-v2.1": dataclasses.replace(kling, durations=(5.0, 7.0)),  # a catalogue mistake: 7 s
    }
    b = ReplicateBackend(make_settings(emu, tmp_path), catalogue=Catalogue("kwaivgi/kling-v2.1", models))
    with pytest.raises(InvalidRequest, match="does not know the model someone/gone"):
        await b.submit(req(picture, tmp_path, model="someone/gone"))
    with pytest.raises(InvalidRequest, match=r"422.*duration must be one of"):
        await b.submit(req(picture, tmp_path, duration=7.0))
    await b.aclose()


async def test_a_hung_prediction_keeps_running_and_cancels(backend, emu, picture, tmp_path):
    """A prediction that never ends stays RUNNING; cancel ends it, and cancelling again is harmless."""
    emu.script("hang")
    handle = await backend.submit(req(picture, tmp_path))
    await asyncio.sleep(0.2)
    assert (await backend.status(handle)).state is State.RUNNING
    await backend.cancel(handle)
    assert (await backend.status(handle)).state is State.CANCELED
    await backend.cancel(handle)
    await backend.cancel(Handle("replicate", "no-such-prediction"))  # unknown: nothing to stop


async def test_cancelling_a_finished_prediction_leaves_it_succeeded(backend, emu, picture, tmp_path):
    """Cancel after the end changes nothing."""
    handle = await backend.submit(req(picture, tmp_path))
    await emu.wait_until_done(handle.id)
    await backend.cancel(handle)
    assert (await backend.status(handle)).state is State.SUCCEEDED


async def test_recover_finds_the_prediction_a_lost_create_started(backend, emu, picture, tmp_path):
    """No idempotency key: a create whose answer was lost is found again by its model and plain inputs."""
    since = time.time()
    request = req(picture, tmp_path, seed=11, model="wan-video/wan-2.2-i2v-a14b")
    handle = await backend.submit(request)  # as if its answer had been lost on the way back
    other = await backend.submit(req(picture, tmp_path, seed=12, model="wan-video/wan-2.2-i2v-a14b"))

    found = await backend.recover(request, since=since)
    assert found is not None and found.id == handle.id and found.data == {**handle.data, "submitted": ANY}
    assert await backend.recover(request, since=since, known={handle.id}) is None  # an earlier attempt's
    assert await backend.recover(req(picture, tmp_path, seed=13, model="wan-video/wan-2.2-i2v-a14b"),
                                 since=since) is None
    assert await backend.recover(request, since=time.time() + 3600) is None  # older than the lost create
    assert other.id != handle.id and len(emu.creates) == 2  # looking never creates


# -- outputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome, words", [
    ("garbage", "not a video"),
    ("empty", "empty"),
    ("image", "image/png, not a video"),
    ("null", "no output"),
    ("expired", "no output"),
    ("wrong_type", "returned int"),
    ("empty_array", "no output"),
])
async def test_an_output_that_is_not_a_video_is_an_error(backend, emu, picture, tmp_path, outcome, words):
    """Malformed outputs raise a (transient) backend error and leave no file behind."""
    emu.script(outcome)
    handle = await backend.submit(req(picture, tmp_path))
    assert (await finish(backend, handle))[0].state is State.SUCCEEDED
    with pytest.raises(BackendUnavailable, match=words):
        await backend.result(handle)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


async def test_an_array_output_yields_its_first_item(backend, emu, picture, tmp_path):
    """A list where one URI was expected: the first item is the clip."""
    emu.script("array")
    handle = await backend.submit(req(picture, tmp_path))
    await emu.wait_until_done(handle.id)
    assert (await backend.result(handle)).frames == 24


@pytest.mark.parametrize("defect", ["frozen", "flicker"])
async def test_defective_clips_come_back_as_real_videos(backend, emu, picture, tmp_path, defect):
    """Frozen and flickering clips are playable MP4s: judging them is the quality gate's job."""
    emu.script(defect)
    handle = await backend.submit(req(picture, tmp_path))
    await emu.wait_until_done(handle.id)
    result = await backend.result(handle)
    means = [float(f.mean()) for f in video.read_frames(result.video_path, gray=True)]
    steps = np.abs(np.diff(means))
    if defect == "frozen":
        assert steps.max() < 1.0
    else:
        assert steps.min() > 10.0


async def test_http_outputs_download_only_from_allowed_hosts(emu, picture, tmp_path):
    """An http(s) output is fetched from a listed host and refused (permanently) from any other."""
    emu.script("url", "url")
    allowed = ReplicateBackend(make_settings(emu, tmp_path))
    handle = await allowed.submit(req(picture, tmp_path))
    await emu.wait_until_done(handle.id)
    assert (await allowed.result(handle)).frames == 24

    strict = ReplicateBackend(make_settings(emu, tmp_path, provider_download_hosts=["*.replicate.delivery"]))
    handle = await strict.submit(req(picture, tmp_path, output_name="other.mp4"))
    await emu.wait_until_done(handle.id)
    mark = emu.mark()
    with pytest.raises(PermanentBackendError, match=r"refusing to download the output from 127\.0\.0\.1"):
        await strict.result(handle)
    assert not [c for c in emu.calls_since(mark) if c.path.startswith("/delivery/")]
    await allowed.aclose()
    await strict.aclose()


def test_download_host_patterns():
    """``*.host`` matches subdomains only; matching ignores case."""
    hosts = ["replicate.delivery", "*.replicate.delivery"]
    assert host_allowed("pbxt.replicate.delivery", hosts) and host_allowed("Replicate.Delivery", hosts)
    assert not host_allowed("evilreplicate.delivery", hosts) and not host_allowed("fal.media", hosts)
    assert not host_allowed("replicate.delivery", ["*.replicate.delivery"])


@pytest.mark.parametrize("outcome", ["ok", "url"])
async def test_outputs_above_the_size_cap_are_refused(emu, picture, tmp_path, outcome):
    """Neither a data: URI nor a download may exceed max_output_bytes."""
    emu.script(outcome)
    b = ReplicateBackend(make_settings(emu, tmp_path, max_output_bytes=2000))
    handle = await b.submit(req(picture, tmp_path))
    await emu.wait_until_done(handle.id)
    with pytest.raises(PermanentBackendError, match=r"above the 0\.0 MiB cap"):
        await b.result(handle)
    assert not (tmp_path / "out" / "clip.mp4").exists()
    await b.aclose()


# -- webhooks ---------------------------------------------------------------------------------------


@pytest.fixture
async def receiver(backend) -> AsyncIterator[dict]:
    """A web endpoint that verifies webhooks with the backend, as the job system's does."""
    got: dict = {"notices": [], "refusals": []}

    async def hook(request: web.Request) -> web.Response:
        try:
            notice = await backend.verify_webhook(request.headers, await request.read())
        except WebhookRejected as exc:
            got["refusals"].append((exc.status, exc.reason))
            return web.json_response({"error": exc.reason}, status=exc.status)
        got["notices"].append(notice)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/webhooks/replicate", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    got["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/replicate"
    yield got
    await runner.cleanup()


async def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
    return value


async def test_a_signed_webhook_is_accepted_and_a_replay_refused(backend, emu, receiver, picture, tmp_path):
    """Given a prediction with a webhook, when it completes, the signed call is accepted; replayed, it is 409."""
    handle = await backend.submit(req(picture, tmp_path, webhook_url=receiver["url"]))

    [delivery] = await wait_for(lambda: emu.deliveries)
    assert receiver["notices"] == [WebhookNotice(request_id=handle.id)]
    assert delivery.event == "completed" and delivery.status == 200

    assert await emu.replay(delivery) == 409
    assert receiver["refusals"][-1][0] == 409
    secret_fetches = [c for c in emu.calls if c.path == "/v1/webhooks/default/secret"]
    assert len(secret_fetches) == 1, "the signing secret is fetched once and cached"


async def test_a_duplicated_webhook_is_refused_the_second_time(backend, emu, receiver, picture, tmp_path):
    """Replicate resending one event (same webhook-id) is acted on once."""
    emu.duplicate_webhooks = True
    await backend.submit(req(picture, tmp_path, webhook_url=receiver["url"]))
    await wait_for(lambda: len(emu.deliveries) == 2)
    assert [d.status for d in emu.deliveries] == [200, 409]
    assert emu.deliveries[0].headers["webhook-id"] == emu.deliveries[1].headers["webhook-id"]


@pytest.mark.parametrize("tamper, status, words", [
    ({"forge": True}, 401, "bad webhook signature"),
    ({"stale": True}, 401, "stale"),
    ({"body": b"this is not json"}, 400, "not JSON"),
    ({"body": b'{"status": "succeeded"}'}, 400, "no id"),
])
async def test_bad_webhooks_are_refused_with_the_right_status(backend, emu, picture, tmp_path, tamper, status, words):
    """Forged → 401, stale → 401, signed but malformed → 400; nothing is acted on."""
    handle = await backend.submit(req(picture, tmp_path))
    headers, body = emu.webhook_for(handle.id, **tamper)
    with pytest.raises(WebhookRejected) as caught:
        await backend.verify_webhook(headers, body)
    assert caught.value.status == status and words in caught.value.reason


@pytest.mark.parametrize("drop, status", [("webhook-signature", 400), ("webhook-id", 400)])
async def test_a_webhook_missing_its_headers_is_malformed(backend, emu, picture, tmp_path, drop, status):
    """Missing signing headers → 400."""
    handle = await backend.submit(req(picture, tmp_path))
    headers, body = emu.webhook_for(handle.id)
    del headers[drop]
    with pytest.raises(WebhookRejected) as caught:
        await backend.verify_webhook(headers, body)
    assert caught.value.status == status and drop in caught.value.reason


async def test_a_signature_with_garbage_base64_is_a_bad_signature(backend, emu):
    """An unparseable signature is refused as unsigned, not crashed on."""
    body = b'{"id": "abc"}'
    headers = emu.sign(body)
    headers["webhook-signature"] = "v1,!!!" + base64.b64encode(b"x").decode()
    with pytest.raises(WebhookRejected) as caught:
        await backend.verify_webhook(headers, body)
    assert caught.value.status == 401


# -- the emulator, as the client's own helpers see it ---------------------------------------------


async def test_the_emulator_serves_the_clients_run_helpers(emu, picture):
    """``async_run`` (Prefer: wait, FileOutput over data: URIs) and ``owner/name:version`` refs work."""
    client = replicate.Client(api_token=emu.token, base_url=emu.base_url)
    output = await client.async_run("kwaivgi/kling-v2.1", input={"start_image": picture, "prompt": "p"},
                                    file_encoding_strategy="base64")
    assert isinstance(output, FileOutput) and (await output.aread())[4:8] == b"ftyp"
    assert emu.creates[0].headers["Prefer"] == "wait"

    ltx = "lightricks/ltx-video:8c47da666861d081eeb4d1261853087de23923a268a69b63febdf5dc1dee08e4"
    [clip] = await client.async_run(ltx, input={"prompt": "p", "length": 97})
    assert isinstance(clip, FileOutput)
    assert any(c.path.startswith("/v1/models/lightricks/ltx-video/versions/") for c in emu.calls)


async def test_prefer_wait_answers_starting_when_the_wait_runs_out(emu):
    """A create held by ``Prefer: wait=1`` that is still running comes back ``starting``, never ``processing``."""
    emu.script("hang")
    async with httpx.AsyncClient(base_url=emu.base_url, headers={"Authorization": f"Bearer {emu.token}"}) as http:
        started = time.monotonic()
        answer = await http.post("/v1/models/minimax/hailuo-02/predictions", headers={"Prefer": "wait=1"},
                                 json={"input": {"prompt": "p", "duration": 6}})
        assert answer.status_code == 201 and answer.json()["status"] == "starting"
        assert 0.9 < time.monotonic() - started < 10  # held about 1 s, not the whole hang
        missing = await http.post("/v1/models/minimax/hailuo-02/predictions", json={"input": {}})
        assert missing.status_code == 422 and missing.json()["invalid_fields"][0]["field"] == "prompt"


async def test_the_emulator_lists_predictions_by_cursor(emu):
    """``GET /v1/predictions`` pages newest first through full cursor URLs."""
    emu.list_page_size = 2
    client = replicate.Client(api_token=emu.token, base_url=emu.base_url)
    made = [(await client.models.predictions.async_create(model="minimax/hailuo-02", input={"prompt": str(i)})).id
            for i in range(3)]
    first = await client.predictions.async_list()
    second = await client.predictions.async_list(first.next)
    assert [p.id for p in first.results + second.results] == made[::-1] and second.next is None


def test_the_emulator_rejects_unknown_outcomes():
    """The emulator's script names are checked."""
    with pytest.raises(ValueError, match="unknown outcome"):
        Outcome("explode")
