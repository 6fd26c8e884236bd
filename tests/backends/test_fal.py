"""The fal backend against the fal queue emulator, through the real fal_client: what fal answers, the backend maps."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import fal_client.client
import numpy as np
import pytest
from aiohttp import web
from emulators.fal_api import APPS, FalEmulator
from PIL import Image

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
    UnsupportedRequest,
    WebhookRejected,
)
from backends.fal import CATALOGUE, FalBackend, host_allowed
from worker import quality
from worker.settings import Settings

KLING = "fal-ai/kling-video/v2.1/standard/image-to-video"
WAN = "fal-ai/wan-i2v"
HAILUO = "fal-ai/minimax/hailuo-02/standard/image-to-video"
LUMA = "fal-ai/luma-dream-machine/ray-2-flash/image-to-video"
SVD = "fal-ai/stable-video"


@pytest.fixture(autouse=True)
def _restore_fal_client_globals(monkeypatch):
    """The backend points fal_client's module globals at its settings; put them back after each test."""
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fal_client.client.QUEUE_URL_FORMAT)
    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", fal_client.client.MAX_ATTEMPTS)


@pytest.fixture
async def emu():
    async with FalEmulator() as emulator:
        emulator.queue_positions, emulator.running_polls = (), 0  # done on the first poll unless a test says
        yield emulator


def settings_for(tmp_path: Path, emu: FalEmulator, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path, "fal_key": emu.key, "fal_queue_url": emu.base_url, "fal_jwks_url": emu.jwks_url,
        "provider_download_hosts": ["127.0.0.1"],
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
async def backend(tmp_path, emu):
    fal = FalBackend(settings_for(tmp_path, emu), request_timeout=5.0)
    yield fal
    await fal.aclose()


@pytest.fixture
def picture(tmp_path) -> Path:
    yy, xx = np.mgrid[0:144, 0:256]
    pixels = np.dstack([xx % 256, yy * 255 // 143, (xx // 32 + yy // 24) % 2 * 200]).astype(np.uint8)
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    return path


def make_request(picture: Path, **overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "image_path": picture, "prompt": "gentle waves, slow zoom in", "output_dir": picture.parent / "out",
        "output_name": "clip.mp4", "width": 256, "height": 144, "duration": 5.0, "seed": 7,
    }
    return GenerationRequest(**{**values, **overrides})


class Receiver:
    """A web endpoint that answers fal's webhooks the way the job system's does: verify, or refuse."""

    def __init__(self, backend: FalBackend) -> None:
        self.backend = backend
        self.notices: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook?attempt=1&token=abc"
        return self

    async def hook(self, request: web.Request) -> web.Response:
        try:
            notice = await self.backend.verify_webhook(request.headers, await request.read())
        except WebhookRejected as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        self.notices.append(notice)
        return web.json_response({"ok": True})


@pytest.fixture
async def receiver(backend):
    hooks = await Receiver(backend).start()
    yield hooks
    await hooks.runner.cleanup()


async def poll_until_done(fal: FalBackend, handle: Handle, limit: int = 10) -> list:
    reports = []
    for _ in range(limit):
        reports.append(await fal.status(handle))
        if reports[-1].state.terminal:
            break
    return reports


# -- the happy path ------------------------------------------------------------------------------------


async def test_submit_waits_in_the_queue_then_returns_a_real_clip(backend, emu, picture):
    """Submit → QUEUED with positions → RUNNING → SUCCEEDED → an MP4 on disk, priced from the catalogue."""
    emu.queue_positions, emu.running_polls = (2, 1, 0), 1
    handle = await backend.submit(make_request(picture, negative_prompt="blur"))

    job = emu.jobs[handle.id]
    assert job.app == KLING and job.webhook is None and job.unknown == []
    assert job.arguments["duration"] == "5" and job.arguments["cfg_scale"] == 0.5
    assert job.arguments["negative_prompt"] == "blur" and "seed" not in job.arguments  # Kling takes no seed
    assert job.arguments["image_url"].startswith("data:image/jpeg;base64,")
    assert json.loads(json.dumps(handle.to_json()))["data"]["app"] == KLING

    reports = await poll_until_done(backend, handle)
    assert [r.state for r in reports] == [State.QUEUED] * 3 + [State.RUNNING, State.SUCCEEDED]
    assert [r.queue_position for r in reports[:3]] == [2, 1, 0]
    status_calls = [r for r in emu.requests if r.path.endswith("/status")]
    assert {r.path for r in status_calls} == {f"/fal-ai/kling-video/requests/{handle.id}/status"}  # sub-path dropped
    assert {r.query["logs"] for r in status_calls} == {"false"}
    assert {r.headers["Authorization"] for r in emu.requests} == {f"Key {emu.key}"}

    result = await backend.result(handle)

    assert result.video_path == picture.parent / "out" / "clip.mp4" and result.video_path.is_file()
    info = video.probe(result.video_path)
    assert (info.width, info.height, info.frames) == (256, 144, 24) == (result.width, result.height, result.frames)
    assert result.cost_usd == pytest.approx(0.28)
    assert not list(result.video_path.parent.glob(".*"))  # no partial downloads left behind


async def test_a_new_backend_instance_finishes_an_old_handle(tmp_path, emu, picture):
    """Resume after a restart: the stored handle alone lets another instance poll and fetch the result."""
    emu.queue_positions = (0,)
    first = FalBackend(settings_for(tmp_path, emu))
    stored = json.dumps((await first.submit(make_request(picture))).to_json())
    assert (await first.status(Handle.from_json(json.loads(stored)))).state is State.QUEUED
    await first.aclose()

    second = FalBackend(settings_for(tmp_path, emu))
    handle = Handle.from_json(json.loads(stored))
    assert (await second.status(handle)).state is State.SUCCEEDED
    result = await second.result(handle)
    await second.aclose()

    assert result.frames == 24 and emu.count("POST") == 1


@pytest.mark.parametrize(("model", "overrides", "expected", "absent"), [
    (WAN, {"duration": 5.0, "negative_prompt": "blur", "aspect": Aspect.SQUARE},
     {"num_frames": 81, "frames_per_second": 16, "aspect_ratio": "1:1", "seed": 7, "negative_prompt": "blur",
      "resolution": "720p"}, ()),
    (HAILUO, {"duration": 6.0, "negative_prompt": "blur"}, {"duration": "6", "prompt_optimizer": False},
     ("negative_prompt", "seed")),
    (LUMA, {"duration": 9.0, "aspect": Aspect.PORTRAIT}, {"duration": "9s", "aspect_ratio": "9:16"}, ("seed",)),
    (SVD, {"duration": 2.0, "camera": CameraMove.STATIC, "motion": 4},
     {"fps": 12, "motion_bucket_id": 220, "seed": 7, "cond_aug": 0.02}, ("prompt",)),
], ids=["wan", "hailuo", "luma", "svd"])
async def test_each_model_gets_its_own_field_names(backend, emu, picture, model, overrides, expected, absent):
    """Durations, aspects, motion and seed are written the way each model takes them, and fal accepts them."""
    handle = await backend.submit(make_request(picture, model=model, **overrides))

    job = emu.jobs[handle.id]
    assert job.app == model and job.unknown == []
    assert {k: job.arguments.get(k) for k in expected} == expected
    assert not set(absent) & set(job.arguments)


# -- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "phrase"), [
    ({"duration": 7.0}, "duration 7s is not offered by Kling 2.1 standard (offered: 5 or 10 s)"),
    ({"model": LUMA, "aspect": Aspect.SQUARE}, "aspect 1:1 is not supported by Luma Ray 2 Flash"),
    ({"model": SVD, "duration": 2.0, "camera": CameraMove.PAN_LEFT},
     "camera 'pan-left' is not supported by Stable Video Diffusion (supported: static)"),
    ({"model": WAN, "duration": 8.0}, "duration 8s is not offered by Wan 2.1 (offered: 5.06..6.25 s)"),
    ({"model": "fal-ai/flux/dev"}, "fal-ai/flux/dev makes text to image, not video"),
    ({"model": "fal-ai/no-such-model"}, "model 'fal-ai/no-such-model' is not in fal's catalogue"),
], ids=["kling-7s", "luma-square", "svd-pan", "wan-8s", "flux", "unknown"])
async def test_what_a_model_cannot_honour_is_refused_by_name_before_any_call(backend, emu, picture, overrides, phrase):
    """The refusal names the value and the model, the routing check says the same, and fal never hears of it."""
    request = make_request(picture, **overrides)

    with pytest.raises(UnsupportedRequest, match=re.escape(phrase)):
        await backend.submit(request)

    assert any(phrase in r for r in FalBackend.capabilities.refusals(request))  # what routing asks
    assert emu.requests == []


async def test_an_end_frame_is_refused_by_name_where_the_model_takes_none(backend, emu, picture):
    """Kling 2.1 standard has no tail image: refused before any call, naming the models that have one."""
    request = make_request(picture, end_image_path=picture)
    phrase = ("an end frame is not supported by Kling 2.1 standard (models with one: Kling 2.1 pro, "
              "MiniMax Hailuo-02 standard, Luma Ray 2 Flash)")
    with pytest.raises(UnsupportedRequest, match=re.escape(phrase)):
        await backend.submit(request)
    assert phrase in FalBackend.capabilities.refusals(request)  # what routing asks
    assert emu.requests == []


@pytest.mark.parametrize(("model", "duration", "field"), [
    ("fal-ai/kling-video/v2.1/pro/image-to-video", 5.0, "tail_image_url"),
    (HAILUO, 6.0, "end_image_url"),
    (LUMA, 5.0, "end_image_url"),
], ids=["kling-pro", "hailuo", "luma"])
async def test_an_end_frame_goes_to_each_models_own_field(backend, emu, picture, tmp_path, model, duration, field):
    """The end frame travels as a second JPEG data: URI in the model's own field, which fal accepts."""
    end = tmp_path / "end.png"
    Image.fromarray(np.full((144, 256, 3), (200, 40, 90), np.uint8)).save(end)
    handle = await backend.submit(make_request(picture, model=model, duration=duration, end_image_path=end))

    job = emu.jobs[handle.id]
    assert job.unknown == []
    assert job.arguments["image_url"].startswith("data:image/jpeg;base64,")
    assert job.arguments[field].startswith("data:image/jpeg;base64,")
    assert job.arguments[field] != job.arguments["image_url"]
    await emu.finish(handle.id)
    assert (await backend.status(handle)).state is State.SUCCEEDED
    assert f"fal:{model}" in FalBackend.end_frame_models()


async def test_without_a_key_nothing_is_sent(tmp_path, emu, picture):
    """No ANIMABOT_FAL_KEY: unusable, and a submit says which setting is missing."""
    settings = settings_for(tmp_path, emu, fal_key="")
    assert not FalBackend.check_usable(settings).usable

    with pytest.raises(PermanentBackendError, match="ANIMABOT_FAL_KEY"):
        await FalBackend(settings).submit(make_request(picture))
    assert emu.requests == []


# -- HTTP faults and the client's own retries -------------------------------------------------------------


@pytest.mark.parametrize(("status", "headers", "body", "kind", "phrase"), [
    (429, {"Retry-After": "7"}, None, RateLimited, "retry after 7s"),
    (503, {}, {"detail": "<html>503 Service Temporarily Unavailable nginx</html>"}, BackendUnavailable, "HTTP 503"),
    (409, {}, None, BackendUnavailable, "HTTP 409"),
    (401, {}, {"detail": "Invalid key"}, PermanentBackendError, "check ANIMABOT_FAL_KEY"),
    (422, {}, {"detail": [{"loc": ["body", "prompt"], "msg": "Prompt too long", "type": "string_too_long"}]},
     InvalidRequest, "prompt: Prompt too long"),
], ids=["429", "503-ingress", "409", "401", "422"])
async def test_submit_faults_map_to_error_kinds_with_one_post(backend, emu, picture, status, headers, body, kind,
                                                              phrase):
    """fal_client would retry 429/409/ingress 5xx up to 10×; with its retries off, fal sees exactly one POST."""
    emu.inject("POST", r"^/fal-ai/", status, headers=headers, body=body)

    with pytest.raises(kind, match=re.escape(phrase)) as caught:
        await backend.submit(make_request(picture))

    assert emu.count("POST") == 1 and emu.jobs == {}
    if kind is RateLimited:
        assert caught.value.retry_after == 7 and caught.value.transient


async def test_a_wrong_key_and_an_unknown_model_are_permanent(tmp_path, emu, picture, monkeypatch):
    """fal's own 401 says to check the key; a model fal does not have is an invalid request, not an outage."""
    with pytest.raises(PermanentBackendError, match="check ANIMABOT_FAL_KEY"):
        await FalBackend(settings_for(tmp_path, emu, fal_key="wrong")).submit(make_request(picture))

    monkeypatch.delitem(APPS, KLING)
    with pytest.raises(InvalidRequest, match="fal has no model"):
        await FalBackend(settings_for(tmp_path, emu)).submit(make_request(picture))


@pytest.mark.parametrize(("status", "kind"), [(500, BackendUnavailable), (429, RateLimited)])
async def test_a_failing_poll_is_transient_and_not_retried(backend, emu, picture, status, kind):
    """A 5xx or 429 on a status poll is the asking failing, not the generation: transient, one GET."""
    handle = await backend.submit(make_request(picture))
    emu.inject("GET", r"/status$", status)

    with pytest.raises(kind):
        await backend.status(handle)

    assert emu.count("GET", r"/status$") == 1
    assert (await backend.status(handle)).state is State.SUCCEEDED


async def test_a_request_fal_forgot_is_a_lost_generation(backend, emu, picture):
    """A 404 for a request fal once accepted ends the attempt at once (transient: the job submits again)."""
    handle = await backend.submit(make_request(picture))
    del emu.jobs[handle.id]

    report = await backend.status(handle)

    assert report.state is State.FAILED and isinstance(report.error, BackendUnavailable)
    assert "no longer knows" in report.message


async def test_a_hung_connection_times_out(tmp_path, emu, picture):
    """fal not answering at all is an outage after ``request_timeout``, not a stuck worker."""
    fal = FalBackend(settings_for(tmp_path, emu), request_timeout=0.3)
    handle = await fal.submit(make_request(picture))
    emu.inject("GET", r"/status$", hang=True)

    with pytest.raises(BackendUnavailable, match="did not answer in time"):
        await fal.status(handle)
    await fal.aclose()


async def test_server_side_retries_can_be_turned_off(tmp_path, emu, picture):
    """``server_retries=False`` sends ``x-fal-no-retry: 1``; the default leaves fal's own retries on."""
    on = await FalBackend(settings_for(tmp_path, emu)).submit(make_request(picture))
    off = await FalBackend(settings_for(tmp_path, emu), server_retries=False).submit(make_request(picture))

    assert "x-fal-no-retry" not in {k.lower() for k in emu.jobs[on.id].headers}
    assert {k.lower(): v for k, v in emu.jobs[off.id].headers.items()}["x-fal-no-retry"] == "1"


# -- failed generations --------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "kind", "phrase"), [
    ("fail", BackendUnavailable, "HTTP 500"),
    ("invalid", InvalidRequest, "image_url: Could not load the image"),
    ("refuse", ContentRefused, "flagged by the content checker"),
    ("timeout", BackendTimeout, "timed out"),
    ("disconnected", BackendUnavailable, "runner_disconnected"),
])
async def test_a_failed_generation_is_classified(backend, emu, picture, outcome, kind, phrase):
    """COMPLETED + error becomes FAILED with the error kind fal's answer means; the result says the same."""
    emu.script(outcome)
    handle = await backend.submit(make_request(picture))

    report = await backend.status(handle)

    assert report.state is State.FAILED
    assert type(report.error) is kind and phrase in report.error.message
    with pytest.raises(kind):
        await backend.result(handle)


async def test_a_hung_generation_keeps_running_until_canceled(backend, emu, picture):
    """IN_PROGRESS forever is RUNNING forever (the job system's deadline ends it); cancel is idempotent."""
    emu.script("hang")
    handle = await backend.submit(make_request(picture))

    assert {(await backend.status(handle)).state for _ in range(5)} == {State.RUNNING}
    await backend.cancel(handle)
    await backend.cancel(handle)  # fal: ALREADY_COMPLETED, which is fine

    assert (await backend.status(handle)).state is State.CANCELED
    assert emu.count("PUT", r"/cancel$") == 2


async def test_cancel_a_queued_request(backend, emu, picture):
    """A queued request canceled at fal reports CANCELED; canceling a finished one is a no-op."""
    emu.queue_positions = (3, 2, 1, 0)
    handle = await backend.submit(make_request(picture))
    await backend.cancel(handle)
    assert (await backend.status(handle)).state is State.CANCELED

    done = await backend.submit(make_request(picture))
    await emu.finish(done.id)
    await backend.cancel(done)
    assert (await backend.status(done)).state is State.SUCCEEDED


# -- outputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "kind", "phrase"), [
    ("no_video", PermanentBackendError, "has no 'video' file"),
    ("not_video", BackendUnavailable, "is not a video"),
])
async def test_malformed_outputs_are_errors(backend, emu, picture, outcome, kind, phrase):
    """A result without its file, or a file that does not decode, never becomes a clip."""
    emu.script(outcome)
    handle = await backend.submit(make_request(picture))
    assert (await backend.status(handle)).state is State.SUCCEEDED

    with pytest.raises(kind, match=phrase):
        await backend.result(handle)
    assert not (picture.parent / "out" / "clip.mp4").exists()


@pytest.mark.parametrize(("outcome", "reason"), [("frozen", "frozen"), ("flicker", "flicker")])
async def test_defective_clips_arrive_as_real_video_for_the_gate(backend, emu, picture, outcome, reason):
    """The emulator's frozen and flickering clips are real MP4s that the quality gate names."""
    emu.script(outcome)
    handle = await backend.submit(make_request(picture))
    await backend.status(handle)

    result = await backend.result(handle)

    verdict = quality.judge(result.video_path, width=256, height=144, fps=24, duration=1.0)
    assert reason in verdict.reasons


async def test_a_clip_of_another_size_is_fitted_to_the_request(backend, emu, picture):
    """Models render at their own resolution; the clip comes back at the requested size."""
    emu.clip_size = (320, 180)
    handle = await backend.submit(make_request(picture))
    await backend.status(handle)

    result = await backend.result(handle)

    info = video.probe(result.video_path)
    assert (result.width, result.height) == (256, 144) == (info.width, info.height)
    assert result.metadata["provider_size"] == [320, 180]


async def test_outputs_are_downloaded_from_allowed_hosts_only(tmp_path, emu, picture):
    """Hosted outputs: fetched from an allowed host (also after a redirect), refused from any other."""
    emu.output = "hosted"
    allowed = FalBackend(settings_for(tmp_path, emu))
    handle = await allowed.submit(make_request(picture))
    await allowed.status(handle)
    assert (await allowed.result(handle)).frames == 24

    emu.file_redirect = f"http://localhost:{emu.port}/files/{handle.id}.mp4?redirected=1"
    with pytest.raises(PermanentBackendError, match=r"localhost, which is not an allowed download host"):
        await allowed.result(handle)

    strict = FalBackend(settings_for(tmp_path, emu, provider_download_hosts=["fal.media", "*.fal.media"]))
    gets = emu.count("GET", r"^/files/")
    with pytest.raises(PermanentBackendError, match=r"127\.0\.0\.1, which is not an allowed.*fal\.media"):
        await strict.result(handle)
    assert emu.count("GET", r"^/files/") == gets
    await allowed.aclose()


@pytest.mark.parametrize(("output", "declared", "chunked"), [
    ("data", True, False), ("data", False, False), ("hosted", False, False), ("hosted", False, True),
], ids=["declared", "data-uri", "content-length", "streamed"])
async def test_outputs_above_the_cap_are_refused(tmp_path, emu, picture, output, declared, chunked):
    """The size cap holds whether fal declares the size, sends a data: URI, a Content-Length, or neither."""
    emu.output, emu.declare_file_size, emu.file_chunked = output, declared, chunked
    fal = FalBackend(settings_for(tmp_path, emu, max_output_bytes=2000))
    handle = await fal.submit(make_request(picture))
    await fal.status(handle)

    with pytest.raises(PermanentBackendError, match=r"above the .* cap"):
        await fal.result(handle)
    out = picture.parent / "out"
    assert not out.exists() or not list(out.iterdir())


def test_download_hosts_match_exactly_or_by_subdomain_wildcard():
    """``*.fal.media`` matches subdomains only; plain entries match exactly."""
    hosts = ["fal.media", "*.fal.media"]
    assert host_allowed("v3.fal.media", hosts) and host_allowed("FAL.media", hosts)
    assert not host_allowed("evilfal.media", hosts) and not host_allowed("fal.media.evil.com", hosts)


# -- webhooks ------------------------------------------------------------------------------------------


async def test_a_signed_webhook_on_completion_is_accepted(backend, emu, picture, receiver):
    """fal's webhook, signed with the JWKS key, is a notice to poll the request it names."""
    handle = await backend.submit(make_request(picture, webhook_url=receiver.url))
    assert emu.jobs[handle.id].webhook == receiver.url

    await emu.finish(handle.id)
    delivery = await emu.wait_for(lambda: emu.deliveries and emu.deliveries[0].status and emu.deliveries[0])

    assert delivery.status == 200, delivery.answer
    [notice] = receiver.notices
    assert notice.request_id == handle.id and notice.report is None
    assert emu.jwks_fetches == 1


async def test_an_error_webhook_carries_the_failure(backend, emu, picture, receiver):
    """An ``ERROR`` webhook says what went wrong, classified like a poll would."""
    emu.script("refuse")
    handle = await backend.submit(make_request(picture, webhook_url=receiver.url))
    await emu.finish(handle.id)
    await emu.wait_for(lambda: receiver.notices)

    [notice] = receiver.notices
    assert notice.report.state is State.FAILED and isinstance(notice.report.error, ContentRefused)


@pytest.mark.parametrize(("options", "status", "reason"), [
    ({"forge": True}, 401, "bad webhook signature"),
    ({"tamper": True}, 401, "bad webhook signature"),
    ({"stale": 301}, 401, "more than 300s off"),
    ({"body": b"not json"}, 400, "not JSON"),
])
async def test_bad_webhooks_are_refused(backend, emu, picture, receiver, options, status, reason):
    """Forged, altered, stale or malformed webhooks are answered with the matching status, never acted on."""
    emu.webhook_auto = False
    handle = await backend.submit(make_request(picture, webhook_url=receiver.url))
    await emu.finish(handle.id)

    delivery = await emu.send_webhook(handle.id, **options)

    assert delivery.status == status and reason in delivery.answer
    assert receiver.notices == []


async def test_replayed_and_duplicated_webhooks_are_refused(backend, emu, picture, receiver):
    """The same request id and timestamp twice is a replay (409); fal's own retries carry a new timestamp."""
    emu.webhook_auto = False
    handle = await backend.submit(make_request(picture, webhook_url=receiver.url))
    await emu.finish(handle.id)

    first = await emu.send_webhook(handle.id, duplicate=True)
    again = await emu.replay(first)

    assert [d.status for d in emu.deliveries] == [200, 409, 409] and first is emu.deliveries[0]
    assert again.status == 409 and len(receiver.notices) == 1


async def test_unsigned_or_garbled_headers_are_refused(backend):
    """No signature headers → 401; a timestamp or signature that is not one → 400."""
    with pytest.raises(WebhookRejected) as unsigned:
        await backend.verify_webhook({}, b"{}")
    assert unsigned.value.status == 401

    headers = {"x-fal-webhook-request-id": "r", "x-fal-webhook-user-id": "u", "x-fal-webhook-timestamp": "soon",
               "x-fal-webhook-signature": "zz"}
    with pytest.raises(WebhookRejected) as garbled:
        await backend.verify_webhook(headers, b"{}")
    assert garbled.value.status == 400


async def test_a_new_signing_key_costs_one_jwks_refetch(backend, emu, picture, receiver):
    """A key rotation is picked up with one refetch; a burst of forgeries after it does not refetch again."""
    emu.webhook_auto = False
    handle = await backend.submit(make_request(picture, webhook_url=receiver.url))
    await emu.finish(handle.id)
    assert (await emu.send_webhook(handle.id)).status == 200
    assert emu.jwks_fetches == 1

    emu.rotate_key(keep_old=False)
    assert (await emu.send_webhook(handle.id, stale=10)).status == 200  # another timestamp: not a replay
    assert emu.jwks_fetches == 2

    statuses = [(await emu.send_webhook(handle.id, forge=True, stale=20 + 10 * n)).status for n in range(3)]
    assert statuses == [401, 401, 401] and emu.jwks_fetches == 2


async def test_unreachable_signing_keys_ask_fal_to_retry(tmp_path, emu, picture):
    """Without the JWKS nothing can be verified: 503, and fal retries the webhook later."""
    fal = FalBackend(settings_for(tmp_path, emu, fal_jwks_url=f"{emu.base_url}/nowhere.json"))
    hooks = await Receiver(fal).start()
    emu.webhook_auto = False
    handle = await fal.submit(make_request(picture, webhook_url=hooks.url))
    await emu.finish(handle.id)

    delivery = await emu.send_webhook(handle.id)

    assert delivery.status == 503 and "cannot fetch fal's webhook keys" in delivery.answer
    await hooks.runner.cleanup()
    await fal.aclose()


# -- stills (text-to-image) ----------------------------------------------------------------------------


def still(tmp_path: Path, **overrides: Any) -> ImageRequest:
    values: dict[str, Any] = {"prompt": "a lighthouse at dusk", "output_path": tmp_path / "still.png",
                              "width": 1280, "height": 720, "seed": 11}
    return ImageRequest(**{**values, **overrides})


async def test_imagine_paints_a_still_with_flux_dev_through_the_queue(backend, emu, tmp_path):
    """FLUX.1 dev by default: size and seed in its own fields, queued, polled, the picture written as PNG."""
    emu.queue_positions, emu.running_polls = (1,), 1
    result = await backend.imagine(still(tmp_path))

    [job] = emu.jobs.values()
    assert job.app == "fal-ai/flux/dev" and job.unknown == []
    assert job.arguments == {"prompt": "a lighthouse at dusk", "seed": 11, "image_size": {"width": 1280, "height": 720},
                             "num_inference_steps": 28, "guidance_scale": 3.5, "num_images": 1}
    assert emu.count("GET", r"/status$") == 3  # queued, running, completed
    with Image.open(result.image_path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (1280, 720))
    assert result.cost_usd == pytest.approx(0.025)  # one started megapixel
    assert FalBackend.image_models == ("fal-ai/flux/dev",)


async def test_a_hosted_still_is_downloaded_from_allowed_hosts_only(tmp_path, emu):
    """A still on fal's file host is fetched like a clip: from an allowed host, else refused for good."""
    emu.output = "hosted"
    allowed = FalBackend(settings_for(tmp_path, emu), request_timeout=5.0)
    elsewhere = FalBackend(settings_for(tmp_path, emu, provider_download_hosts=["fal.media"]), request_timeout=5.0)
    try:
        assert (await allowed.imagine(still(tmp_path, width=512, height=288))).width == 512
        with pytest.raises(PermanentBackendError, match="not an allowed download host"):
            await elsewhere.imagine(still(tmp_path, output_path=tmp_path / "other.png"))
    finally:
        await allowed.aclose()
        await elsewhere.aclose()


@pytest.mark.parametrize(("outcome", "kind", "phrase"), [
    ("refuse", ContentRefused, "flagged by the content checker"),
    ("fail", BackendUnavailable, "500"),
    ("not_video", BackendUnavailable, "is not a picture"),
])
async def test_a_failed_still_raises_its_classified_error(backend, emu, tmp_path, outcome, kind, phrase):
    """Moderation is permanent; an outage or output that is no picture is worth another try."""
    emu.script(outcome)
    with pytest.raises(kind, match=phrase):
        await backend.imagine(still(tmp_path))
    assert not (tmp_path / "still.png").exists()


async def test_a_still_that_takes_too_long_is_canceled_and_times_out(backend, emu, tmp_path):
    """Past still_timeout the request is canceled in fal's queue and the error is a (transient) timeout."""
    backend.still_timeout = 0.2
    emu.script("hang")
    with pytest.raises(BackendTimeout, match="made no picture"):
        await backend.imagine(still(tmp_path))
    [job] = emu.jobs.values()
    assert job.canceled


# -- the catalogue -------------------------------------------------------------------------------------


def test_the_catalogue_prices_and_capabilities():
    """Prices follow each model's billing unit; the class declares the union, each model its own."""
    assert CATALOGUE.model(None).id == KLING
    assert CATALOGUE.model(KLING).price.usd(10) == pytest.approx(0.56)
    assert CATALOGUE.model(LUMA).price.usd(9) == pytest.approx(0.40)
    assert CATALOGUE.model(WAN).price.usd(81 / 16) == pytest.approx(0.40)
    assert CATALOGUE.model(WAN).price.usd(100 / 16) == pytest.approx(0.50)
    caps = FalBackend.capabilities
    assert caps.durations == (1.0, 10.0) and caps.settings == ("fal_key",) and caps.needs_network
    assert caps.cost_per_second_usd == pytest.approx(0.056) and caps.fps == 24
    assert FalBackend.model_capabilities(SVD).cameras == frozenset({CameraMove.STATIC})
    assert Aspect.SQUARE not in FalBackend.model_capabilities(LUMA).aspects
    assert FalBackend.model_capabilities("fal-ai/flux/dev") is None
