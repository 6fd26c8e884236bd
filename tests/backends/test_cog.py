"""The cog backend against the real Cog server (coglet, running our tiny predictor) and the Cog emulator.

The cycle is the job system's: submit with our key → the server POSTs its webhooks to a small receiver
here → :meth:`verify_webhook` → the notice's data merged into the handle → :meth:`status` → :meth:`result`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from conftest import service_unavailable
from emulators.cog_api import CogEmulator
from PIL import Image

from backends import video
from backends.base import (
    BackendUnavailable,
    ContentRefused,
    GenerationRequest,
    Handle,
    InvalidRequest,
    PermanentBackendError,
    RateLimited,
    State,
    StatusReport,
    UnsupportedRequest,
    WebhookRejected,
)
from backends.cog import Catalogue, CogBackend, load_catalogue, parse_catalogue
from worker.settings import Settings

ASSETS = Path(__file__).parents[2] / "bot" / "assets"


class Receiver:
    """animabot's web endpoint, reduced to recording the webhooks that reach it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        self.answer = 200
        self.url = ""
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/webhooks/cog/{attempt}/{token}", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def _hook(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, dict(request.headers), await request.read()))
        self._arrived.set()
        return web.json_response({"ok": True}, status=self.answer)

    def hook_url(self, attempt: int = 1) -> str:
        return f"{self.url}/webhooks/cog/{attempt}/t0ken"

    def bodies(self, prediction_id: str) -> list[dict]:
        return [b for b in (json.loads(body) for _, _, body in self.calls) if b.get("id") == prediction_id]

    async def next_call(self, seen: int, timeout: float = 15.0) -> tuple[dict[str, str], bytes]:
        """The webhook after the first ``seen`` ones, waiting for it."""
        async with asyncio.timeout(timeout):
            while len(self.calls) <= seen:
                self._arrived.clear()
                await self._arrived.wait()
        _, headers, body = self.calls[seen]
        return headers, body


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r._runner.cleanup()


@dataclass(frozen=True)
class Server:
    """A Cog server under test: its address, and for the real one its working directory."""

    url: str
    workdir: Path | None = None

    async def wait_running(self, seed: int) -> None:
        """Wait until the real predictor's run() started (see cog_predictor: a cancel before is lost)."""
        if self.workdir is not None:
            async with asyncio.timeout(10):
                while not (self.workdir / f"running-{seed}").exists():
                    await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def real_cog(tmp_path_factory) -> Iterator[Server]:
    """The real Cog server (coglet) on our predictor, with an OpenAPI schema so that bad input is a 422."""
    try:
        from emulators.cog_predictor import start_cog_server
    except ImportError as exc:
        service_unavailable(f"cog is not installed ({exc}); pip install cog==0.23.1")
    workdir = tmp_path_factory.mktemp("cog")
    try:
        with start_cog_server(workdir, schema=True) as url:
            yield Server(url, workdir)
    except RuntimeError as exc:
        service_unavailable(f"the real Cog server did not start: {exc}")


@pytest.fixture
async def emu() -> AsyncIterator[CogEmulator]:
    async with CogEmulator() as emulator:
        yield emulator


@pytest.fixture(params=["real", "emulator"])
async def server(request) -> AsyncIterator[Server]:
    """A Cog server: the real one, then the emulator."""
    if request.param == "real":
        yield request.getfixturevalue("real_cog")
    else:
        async with CogEmulator() as emulator:
            yield Server(emulator.url)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    with Image.open(ASSETS / "astronaut.png") as im:
        small = im.convert("RGB").resize((320, 180))
    path = tmp_path_factory.mktemp("img") / "source.png"
    small.save(path)
    return path


_open: list[CogBackend] = []


def make_backend(url: str, tmp_path: Path, *, catalogue: Catalogue | None = None, **overrides) -> CogBackend:
    backend = CogBackend(Settings(data_dir=tmp_path, cog_url=url, **overrides), catalogue=catalogue)
    backend.health_ttl = 0  # every status() asks the server, so that a test sees each change at once
    _open.append(backend)
    return backend


@pytest.fixture(autouse=True)
async def _close_backends() -> AsyncIterator[None]:
    yield
    while _open:
        await _open.pop().aclose()


def make_request(picture: Path, tmp_path: Path, receiver: Receiver, prompt: str = "the astronaut waves",
                 **overrides) -> GenerationRequest:
    values = dict(image_path=picture, prompt=prompt, output_dir=tmp_path, output_name="out.mp4", duration=1.0,
                  fps=16, width=320, height=180, seed=7, key=f"animabot-job1-attempt1-{uuid.uuid4().hex[:8]}",
                  webhook_url=receiver.hook_url(), negative_prompt="blur")
    values.update(overrides)
    return GenerationRequest(**values)


async def run_to_end(backend: CogBackend, handle: Handle, receiver: Receiver,
                     seen: int = 0) -> tuple[Handle, StatusReport]:
    """Feed the webhooks to the backend as the job system does, until status says it ended."""
    while True:
        headers, body = await receiver.next_call(seen)
        seen += 1
        notice = await backend.verify_webhook(headers, body)
        assert notice.request_id == handle.id
        handle = Handle(handle.backend, handle.id, {**handle.data, **notice.data})
        report = await backend.status(handle)
        if report.state.terminal:
            return handle, report


# -- against the real server and the emulator -------------------------------------------------------

async def test_full_cycle_gives_a_real_mp4(server, receiver, picture, tmp_path):
    """Submit → webhooks → status SUCCEEDED → result: an H.264 clip of the requested length."""
    backend = make_backend(server.url, tmp_path)
    request = make_request(picture, tmp_path, receiver)
    # Given a submitted prediction
    handle = await backend.submit(request)
    assert handle.id == request.key and handle.backend == "cog"
    assert (await backend.status(handle)).state is State.RUNNING
    # When its webhooks arrive and are merged into the handle
    handle, report = await run_to_end(backend, handle, receiver)
    # Then it succeeded and the result is a real video
    assert report.state is State.SUCCEEDED
    result = await backend.result(handle)
    assert result.video_path == tmp_path / "out.mp4" and result.cost_usd == 0
    info = video.probe(result.video_path)
    assert (info.width, info.height, info.frames, round(info.fps)) == (320, 180, 16, 16)
    assert result.frames == 16
    first = receiver.bodies(handle.id)[0]
    assert first["status"] == "processing"  # Cog's `start` event


async def test_the_same_submit_twice_starts_one_prediction(server, receiver, picture, tmp_path):
    """PUT is idempotent while the prediction runs: a retried submit joins the running generation."""
    backend = make_backend(server.url, tmp_path)
    request = make_request(picture, tmp_path, receiver, prompt="waves [slow=1]")
    first = await backend.submit(request)
    second = await backend.submit(request)
    assert first.id == second.id
    _, report = await run_to_end(backend, second, receiver)
    assert report.state is State.SUCCEEDED
    await asyncio.sleep(0.3)  # a second generation would have reported by now
    finals = [b for b in receiver.bodies(first.id) if b["status"] == "succeeded"]
    assert len(finals) == 1


@pytest.mark.parametrize(("marker", "kind"), [
    ("[fail]", BackendUnavailable),
    ("[oom]", BackendUnavailable),
    ("[nsfw]", ContentRefused),
])
async def test_a_failed_prediction_gives_the_right_error_kind(server, receiver, picture, tmp_path, marker, kind):
    """The error of a failed prediction is classified: moderation is permanent, the rest transient."""
    backend = make_backend(server.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver, prompt=f"waves {marker}"))
    handle, report = await run_to_end(backend, handle, receiver)
    assert report.state is State.FAILED
    assert type(report.error) is kind
    assert "Prediction failed: Prediction" not in report.message and report.message.startswith("the Cog model")


async def test_cancel_stops_a_running_prediction(server, receiver, picture, tmp_path):
    """Cancel makes the server report CANCELED; canceling again is harmless."""
    backend = make_backend(server.url, tmp_path)
    request = make_request(picture, tmp_path, receiver, prompt="waves [hang]", seed=101)
    handle = await backend.submit(request)
    await server.wait_running(request.seed)
    await backend.cancel(handle)
    handle, report = await run_to_end(backend, handle, receiver)
    assert report.state is State.CANCELED
    await backend.cancel(handle)
    await backend.cancel(Handle("cog", "never-existed", {}))


@pytest.mark.parametrize(("marker", "says"), [("[garbage]", "not a playable video"), ("[image]", "image/png")])
async def test_an_output_that_is_not_a_video_is_refused(server, receiver, picture, tmp_path, marker, says):
    """A model that returns garbage or a picture fails result() with a permanent error."""
    backend = make_backend(server.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver, prompt=f"waves {marker}"))
    handle, report = await run_to_end(backend, handle, receiver)
    assert report.state is State.SUCCEEDED
    with pytest.raises(PermanentBackendError, match=says):
        await backend.result(handle)
    assert not (tmp_path / "out.mp4").exists()


async def test_busy_server_is_back_pressure(server, receiver, picture, tmp_path):
    """409 "At capacity" (every slot busy) is RateLimited with a short retry_after, not a failure."""
    backend = make_backend(server.url, tmp_path)
    busy = await backend.submit(make_request(picture, tmp_path, receiver, prompt="waves [hang]", seed=102))
    with pytest.raises(RateLimited) as caught:
        await backend.submit(make_request(picture, tmp_path, receiver))
    assert caught.value.retry_after == 5 and "At capacity" in caught.value.message
    await server.wait_running(102)
    await backend.cancel(busy)
    await run_to_end(backend, busy, receiver)


async def test_bad_input_is_invalid_request(real_cog, receiver, picture, tmp_path):
    """A server with a schema answers 422 for input it refuses; the field is named."""
    catalogue = load_catalogue()
    model = catalogue.models["i2v"]
    bad = Catalogue(**{**catalogue.__dict__, "models": {"i2v": type(model)(
        **{**model.__dict__, "fixed": {"num_frames": "many"}, "inputs": {"image": "image", "prompt": "prompt"}})}})
    backend = make_backend(real_cog.url, tmp_path, catalogue=bad)
    with pytest.raises(InvalidRequest, match="num_frames"):
        await backend.submit(make_request(picture, tmp_path, receiver))


# -- emulator only: faults the real server does not show on demand -----------------------------------

async def test_a_restarted_server_lost_the_prediction(emu, receiver, picture, tmp_path):
    """A server that restarted (new setup time) no longer has the prediction: FAILED, transient."""
    backend = make_backend(emu.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver, prompt="waves [hang]"))
    emu.restart()
    report = await backend.status(handle)
    assert report.state is State.FAILED and isinstance(report.error, BackendUnavailable)
    assert "restarted" in report.message


async def test_an_idle_server_that_never_reported_lost_the_prediction(emu, receiver, picture, tmp_path):
    """With one slot, a server idle for lost_after seconds while we wait means the final webhook is lost."""
    catalogue = load_catalogue()
    backend = make_backend(emu.url, tmp_path, catalogue=Catalogue(**{**catalogue.__dict__, "lost_after": 0.2}))
    emu.drop_final_webhooks = True
    handle = await backend.submit(make_request(picture, tmp_path, receiver))
    await emu.wait_for(lambda: emu.predictions[handle.id].status == "succeeded")
    assert (await backend.status(handle)).state is State.RUNNING  # the webhook may still be on its way
    await asyncio.sleep(0.25)
    report = await backend.status(handle)
    assert report.state is State.FAILED and isinstance(report.error, BackendUnavailable)
    assert "never reported" in report.message


@pytest.mark.parametrize("state", ["SETUP_FAILED", "DEFUNCT"])
async def test_a_dead_server_fails_running_work_and_refuses_new(emu, receiver, picture, tmp_path, state):
    """SETUP_FAILED / DEFUNCT: running predictions cannot finish, new ones are refused (transient)."""
    backend = make_backend(emu.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver, prompt="waves [hang]"))
    emu.health_status = state
    report = await backend.status(handle)
    assert report.state is State.FAILED and state in report.message
    with pytest.raises(BackendUnavailable, match=state):
        await backend.submit(make_request(picture, tmp_path, receiver))


async def test_a_crashed_worker_fails_the_prediction_and_the_server_is_unhealthy(emu, receiver, picture, tmp_path):
    """coglet fails the prediction with "Worker crashed" and stays UNHEALTHY: no more submits."""
    backend = make_backend(emu.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver, prompt="waves [crash]"))
    handle, report = await run_to_end(backend, handle, receiver)
    assert report.state is State.FAILED and isinstance(report.error, BackendUnavailable)
    with pytest.raises(BackendUnavailable, match="UNHEALTHY"):
        await backend.submit(make_request(picture, tmp_path, receiver))


async def test_a_starting_server_is_unavailable(emu, receiver, picture, tmp_path):
    """While the model loads, PUT answers 503: transient."""
    emu.health_status = "STARTING"
    backend = make_backend(emu.url, tmp_path)
    with pytest.raises(BackendUnavailable, match="not ready"):
        await backend.submit(make_request(picture, tmp_path, receiver))


@pytest.mark.parametrize(("status", "kind"), [(500, BackendUnavailable), (502, BackendUnavailable),
                                              (400, InvalidRequest)])
async def test_server_errors_on_submit(emu, receiver, picture, tmp_path, status, kind):
    """5xx is transient; another 4xx means our request was wrong. Nothing was started either way."""
    emu.put_errors.append((status, {"detail": "boom"}))
    backend = make_backend(emu.url, tmp_path)
    with pytest.raises(kind, match="boom"):
        await backend.submit(make_request(picture, tmp_path, receiver))
    assert emu.starts == []


async def test_duplicated_and_late_webhooks_do_not_undo_the_result(emu, receiver, picture, tmp_path):
    """A repeated final webhook and a `processing` one after it leave the handle succeeded."""
    emu.duplicate_webhooks = emu.late_processing = True
    backend = make_backend(emu.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver))
    handle, _ = await run_to_end(backend, handle, receiver)
    await emu.wait_for(lambda: len(receiver.calls) == 4)  # start, completed ×2, late processing
    for headers, body in [(h, b) for _, h, b in receiver.calls[2:]]:
        notice = await backend.verify_webhook(headers, body)
        handle = Handle(handle.backend, handle.id, {**handle.data, **notice.data})
    assert json.loads(receiver.calls[-1][2])["status"] == "processing"
    assert (await backend.status(handle)).state is State.SUCCEEDED
    assert (await backend.result(handle)).frames == 16


async def test_the_final_webhook_is_retried_when_animabot_answers_5xx(emu, receiver, picture, tmp_path):
    """Like coglet, the emulator retries the final webhook on 5xx (animabot's endpoint was down)."""
    emu.webhook_backoff = 0.01
    receiver.answer = 503
    backend = make_backend(emu.url, tmp_path)
    handle = await backend.submit(make_request(picture, tmp_path, receiver))
    def answered() -> int:  # a record is written before its POST is answered
        return sum(1 for w in emu.webhooks if w["body"]["status"] == "succeeded" and w["status"] is not None)

    await emu.wait_for(lambda: answered() == 6)
    assert all(w["status"] == 503 for w in emu.webhooks)
    assert len(receiver.bodies(handle.id)) == 7


async def test_an_output_url_is_downloaded_from_the_cog_host_only(receiver, picture, tmp_path):
    """With --upload-url the output is a URL: fetched from the Cog host or an allowed host, else refused."""
    async with CogEmulator(output_mode="url") as emu:
        backend = make_backend(emu.url, tmp_path)
        handle = await backend.submit(make_request(picture, tmp_path, receiver))
        handle, _ = await run_to_end(backend, handle, receiver)
        assert handle.data["output"].startswith(emu.url + "/files/")
        assert (await backend.result(handle)).frames == 16
        elsewhere = Handle("cog", handle.id, {**handle.data, "output": "http://files.example.net/x.mp4"})
        with pytest.raises(PermanentBackendError, match=r"files\.example\.net"):
            await backend.result(elsewhere)
        small = make_backend(emu.url, tmp_path, max_output_bytes=1000)
        with pytest.raises(PermanentBackendError, match="MAX_OUTPUT_BYTES"):
            await small.result(handle)
        await backend.aclose()
        await small.aclose()


async def test_the_inputs_follow_the_catalogue(receiver, picture, tmp_path):
    """Wan gets frames_per_second, 4k+1 frames and a resolution; unmapped parameters are not sent."""
    async with CogEmulator(slots=2) as emu:
        backend = make_backend(emu.url, tmp_path)
        wan = await backend.submit(make_request(picture, tmp_path, receiver, model="wan-2.2-i2v", duration=5.0,
                                                width=1280, height=720, prompt="waves [hang]"))
        generic = await backend.submit(make_request(picture, tmp_path, receiver, prompt="waves [hang]"))
        sent = emu.predictions[wan.id].input
        assert sent.pop("image").startswith("data:image/png;base64,")
        assert sent == {"prompt": "waves [hang]", "num_frames": 81, "frames_per_second": 16, "seed": 7,
                        "resolution": "720p", "sample_steps": 30}
        sent = emu.predictions[generic.id].input
        assert sent.pop("image") == "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        assert sent == {"prompt": "waves [hang]", "negative_prompt": "blur", "num_frames": 16, "fps": 16, "seed": 7}
        await backend.cancel(wan)
        await backend.cancel(generic)


async def test_an_end_frame_reaches_a_model_that_maps_one(receiver, picture, tmp_path):
    """A catalogue entry with an `end_image` input gets the end frame as a second data: URI."""
    generic = load_catalogue().models["i2v"]
    ending = dataclasses.replace(generic, inputs={**generic.inputs, "end_image": "last_image"})
    catalogue = dataclasses.replace(load_catalogue(), models={**load_catalogue().models, "i2v": ending})
    async with CogEmulator(slots=2) as emu:
        backend = make_backend(emu.url, tmp_path, catalogue=catalogue)
        handle = await backend.submit(make_request(picture, tmp_path, receiver, prompt="waves [hang]",
                                                   end_image_path=ASSETS / "astronaut.png"))
        sent = emu.predictions[handle.id].input
        assert sent["last_image"] == "data:image/png;base64," + base64.b64encode(
            (ASSETS / "astronaut.png").read_bytes()).decode()
        await backend.cancel(handle)


# -- without a server ---------------------------------------------------------------------------------


async def test_an_end_frame_is_refused_by_name_where_the_model_takes_none(picture, tmp_path, receiver):
    """The built-in entries map no end-frame input: refused before the server is asked, saying how to add one."""
    backend = make_backend("http://127.0.0.1:9", tmp_path)
    request = make_request(picture, tmp_path, receiver, end_image_path=picture)
    [why] = backend.refusals(request)
    assert why.startswith("Cog model 'i2v' takes no end frame (Cog models that can: none;")
    with pytest.raises(UnsupportedRequest, match="takes no end frame"):
        await backend.submit(request)
    assert CogBackend.capabilities.refusals(request)  # routing skips cog for such a job

async def test_submit_without_a_webhook_url_is_refused_by_name(picture, tmp_path):
    """No public URL, no webhooks, no way to learn the result: refused, saying what to set."""
    backend = make_backend("http://127.0.0.1:9", tmp_path)
    request = GenerationRequest(image_path=picture, prompt="x", output_dir=tmp_path, key="k1", duration=1.0)
    with pytest.raises(UnsupportedRequest, match="ANIMABOT_PUBLIC_URL"):
        await backend.submit(request)


async def test_unreachable_server_is_transient(picture, tmp_path, receiver):
    """Nobody listening: submit and status raise BackendUnavailable (the job asks again later)."""
    backend = make_backend("http://127.0.0.1:9", tmp_path)
    with pytest.raises(BackendUnavailable, match="does not answer"):
        await backend.submit(make_request(picture, tmp_path, receiver))
    with pytest.raises(BackendUnavailable):
        await backend.status(Handle("cog", "p1", {"boot": "x"}))


@pytest.mark.parametrize(("body", "why"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"status": "succeeded"}', "no prediction id"),
    (b'{"id": "", "status": "succeeded"}', "no prediction id"),
    (b'{"id": "p1", "status": "exploded"}', "unknown prediction status"),
])
async def test_a_malformed_webhook_is_rejected_with_400(tmp_path, body, why):
    backend = make_backend("http://127.0.0.1:9", tmp_path)
    with pytest.raises(WebhookRejected, match=why) as caught:
        await backend.verify_webhook({}, body)
    assert caught.value.status == 400


async def test_webhook_notices(tmp_path):
    """processing → RUNNING without data; final states carry status, output and error for the handle."""
    backend = make_backend("http://127.0.0.1:9", tmp_path)
    running = await backend.verify_webhook({}, b'{"id": "p1", "status": "processing", "logs": ""}')
    assert running.request_id == "p1" and running.report.state is State.RUNNING and running.data == {}
    done = await backend.verify_webhook({}, json.dumps(
        {"id": "p1", "status": "succeeded", "output": "data:video/mp4;base64,AAAA",
         "metrics": {"predict_time": 1.5}}).encode())
    assert done.report.state is State.SUCCEEDED
    assert done.data == {"status": "succeeded", "output": "data:video/mp4;base64,AAAA", "error": None,
                         "predict_time": 1.5}
    canceled = await backend.verify_webhook({}, b'{"id": "p1", "status": "canceled"}')
    assert canceled.report.state is State.CANCELED
    refused = await backend.verify_webhook({}, b'{"id": "p1", "status": "failed", "error": "Prediction failed: '
                                           b'Prediction failed: ValueError: invalid input: image too small"}')
    assert isinstance(refused.report.error, InvalidRequest)
    assert refused.report.message == "the Cog model failed: ValueError: invalid input: image too small"


def test_refusals_name_what_the_model_cannot_do(tmp_path, picture):
    backend = make_backend("http://127.0.0.1:9", tmp_path)
    base = dict(image_path=picture, prompt="x", output_dir=tmp_path)
    assert backend.refusals(GenerationRequest(**base, duration=5.0)) == []
    [why] = backend.refusals(GenerationRequest(**base, duration=3.0, model="wan-2.2-i2v"))
    assert "49 frames" in why and "81..121" in why and "wan-2.2-i2v" in why
    [why] = backend.refusals(GenerationRequest(**base, duration=5.0, model="sora"))
    assert "'sora' is not in the Cog catalogue" in why and "wan-2.2-i2v" in why
    assert backend.refusals(GenerationRequest(**base, duration=5.0, model="wan-2.2-i2v")) == []  # 81 frames
    [why] = backend.refusals(GenerationRequest(**base, duration=11.0))
    assert why == "duration 11s is outside 1..10s for Cog model 'i2v'"


def test_the_catalogue_is_checked_when_loaded():
    raw = {"default_model": "m", "models": {"m": {"fps": 16, "durations": [1, 5], "inputs": {"prompt": "p"}}}}
    with pytest.raises(ValueError, match="`image`"):
        parse_catalogue(raw)
    raw["models"]["m"]["inputs"] = {"image": "image", "camera": "cam"}
    with pytest.raises(ValueError, match="unknown parameters"):
        parse_catalogue(raw)
    raw["models"]["m"]["inputs"] = {"image": "image"}
    raw["default_model"] = "other"
    with pytest.raises(ValueError, match="default_model"):
        parse_catalogue(raw)
    builtin = load_catalogue()
    assert builtin.default_model in builtin.models and builtin.slots == 1
    assert CogBackend.capabilities.fps == builtin.models[builtin.default_model].fps


def test_class_declaration():
    assert CogBackend.name == "cog" and CogBackend.pollable is False
    caps = CogBackend.capabilities
    assert caps.needs_network and caps.settings == ("cog_url",) and caps.cost_per_second_usd == 0
    assert CogBackend.check_usable(Settings(cog_url="")).reason == "set ANIMABOT_COG_URL"
    assert "ANIMABOT_PUBLIC_URL" in CogBackend.check_usable(Settings(cog_url="http://gpu:5000")).reason
    assert CogBackend.check_usable(Settings(cog_url="http://gpu:5000", public_url="https://bot.example")).usable


def test_a_frozen_clip_is_still_a_video(tmp_path):
    """The emulator's [frozen] marker gives a valid clip whose frames never change (for the quality gate)."""
    from emulators.cog_api import _make_output

    buf = tmp_path / "p.png"
    Image.fromarray(np.full((90, 160, 3), 120, np.uint8)).save(buf)
    uri = "data:image/png;base64," + base64.b64encode(buf.read_bytes()).decode()
    data, mime, _ = _make_output({"image": uri, "prompt": "[frozen]", "num_frames": 8, "fps": 8})
    (tmp_path / "f.mp4").write_bytes(data)
    assert mime == "video/mp4" and video.probe(tmp_path / "f.mp4").frames == 8
