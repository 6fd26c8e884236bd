"""Routing: subject → backend, with user and guild precedence, skipping what cannot do the job."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from backends.base import CameraMove, GenerationRequest
from backends.fake import FakeBackend
from worker.errors import InvalidParameters
from worker.routing import ROUTES_FILE, load_routes, plan_route
from worker.settings import Settings


class SteadyFake(FakeBackend):
    """A backend that only zooms: no orbits, no pans."""

    name = "steady"
    description = "zoom only"
    capabilities = dataclasses.replace(
        FakeBackend.capabilities, cameras=frozenset({CameraMove.ZOOM_IN, CameraMove.ZOOM_OUT})
    )


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path)


def probe(tmp_path: Path, **kw) -> GenerationRequest:
    return GenerationRequest(image_path=tmp_path / "x.png", prompt="p", output_dir=tmp_path, **kw)


def test_every_subject_has_a_route_that_ends_in_an_installed_backend():
    """The table covers every subject the classifier can name, and each list reaches `local`."""
    table = load_routes(ROUTES_FILE)
    for subject in ("portrait", "landscape", "product", "text", "other", "unknown"):
        assert any(step.backend == "local" for step in table[subject]), subject
        assert all(step.reason for step in table[subject]), subject


def test_unconfigured_remote_backends_are_skipped_with_the_reason(settings, tmp_path):
    """Without provider keys, a portrait falls through to local, and the job says why."""
    route = plan_route("portrait", probe(tmp_path), settings)
    assert [s.backend for s in route.steps] == ["local"]
    assert route.origin == "table"
    why = dict((s.backend, reason) for s, reason in route.skipped)
    assert why["replicate"] == "not configured (set ANIMABOT_REPLICATE_API_TOKEN)"
    assert why["fal"] == "not configured (set ANIMABOT_FAL_KEY)"


def test_with_provider_keys_each_subject_goes_to_its_model(tmp_path):
    """Keys set: portraits go to Kling, landscapes to Wan, and local stays the last resort."""
    keyed = Settings(data_dir=tmp_path, replicate_api_token="r8_x", fal_key="k")
    portrait = plan_route("portrait", probe(tmp_path), keyed)
    assert [s.label for s in portrait.steps] == [
        "replicate:kwaivgi/kling-v2.1", "fal:fal-ai/kling-video/v2.1/standard/image-to-video", "local"]
    assert plan_route("landscape", probe(tmp_path), keyed).steps[0].label == "replicate:wan-video/wan-2.2-i2v-a14b"


def test_a_clip_longer_than_a_model_makes_still_routes_to_it_in_its_own_lengths(tmp_path):
    """20 s on Kling (5 or 10 s only) is planned as segments it can make, not skipped."""
    keyed = Settings(data_dir=tmp_path, replicate_api_token="r8_x")
    route = plan_route("portrait", probe(tmp_path, duration=20), keyed)
    assert route.steps[0].label == "replicate:kwaivgi/kling-v2.1"


def test_the_users_backend_always_wins(settings, tmp_path):
    """An explicit backend is the whole route, whatever the subject."""
    route = plan_route("portrait", probe(tmp_path), settings, backend="fake")
    assert [s.backend for s in route.steps] == ["fake"] and route.origin == "user"


def test_a_users_backend_that_cannot_do_the_job_is_refused_by_name(settings, tmp_path):
    """No silent fallback when the user named the backend: the message names the camera and what works."""
    with pytest.raises(InvalidParameters, match=r"backend 'steady' cannot do this: camera 'orbit-left' is not "
                                                r"supported \(supported: zoom-in, zoom-out\)"):
        plan_route("other", probe(tmp_path, camera=CameraMove.ORBIT_LEFT), settings, backend="steady",
                   instances={"steady": SteadyFake(settings)})


def test_a_guild_override_replaces_the_table_for_that_subject(settings, tmp_path):
    """Guild admins choose their own order; local is still appended as the last resort."""
    overrides = {"landscape": [{"backend": "fake", "reason": "our community likes it"}]}
    route = plan_route("landscape", probe(tmp_path), settings, guild_overrides=overrides)
    assert [s.backend for s in route.steps] == ["fake", "local"] and route.origin == "guild"
    assert route.steps[0].reason == "our community likes it"


def test_backends_that_cannot_honour_the_request_are_skipped(settings, tmp_path):
    """An orbit skips the zoom-only backend and lands on local."""
    overrides = {"other": [{"backend": "steady"}]}
    route = plan_route("other", probe(tmp_path, camera=CameraMove.ORBIT_LEFT), settings,
                       guild_overrides=overrides, instances={"steady": SteadyFake(settings)})
    assert [s.backend for s in route.steps] == ["local"]
    assert "camera 'orbit-left' is not supported" in route.skipped[0][1]


def test_a_duration_over_the_backends_limit_is_routed_for_extension(settings, tmp_path):
    """45 s on the fake (max 30 s) is kept: the pipeline builds it from segments."""
    route = plan_route("other", probe(tmp_path, duration=45), settings, backend="fake")
    assert [s.backend for s in route.steps] == ["fake"]


def test_unhealthy_backends_are_skipped(settings, tmp_path):
    """A backend on cooldown is passed over with the health reason."""
    overrides = {"other": [{"backend": "fake"}]}
    route = plan_route("other", probe(tmp_path), settings, guild_overrides=overrides,
                       healthy=lambda b, m: "cooling down after 3 failures" if b == "fake" else None)
    assert [s.backend for s in route.steps] == ["local"]
    assert route.skipped[0][1] == "cooling down after 3 failures"


def test_nothing_usable_names_every_candidates_problem(settings, tmp_path):
    """When no backend can do it, the message lists why for each."""
    with pytest.raises(InvalidParameters, match=r"no backend can do this \(fake: duration 0.5s is outside "
                                                r"1..30s; local: duration 0.5s is outside 1..60s\)"):
        plan_route("other", probe(tmp_path, duration=0.5), settings,
                   guild_overrides={"other": [{"backend": "fake"}]})


def test_instances_given_by_the_caller_are_routed_like_installed_ones(settings, tmp_path):
    """A configured backend instance (e.g. a test double) is considered by its class."""
    route = plan_route("other", probe(tmp_path, camera=CameraMove.ORBIT_LEFT), settings,
                       guild_overrides={"other": [{"backend": "fake"}]},
                       instances={"fake": FakeBackend(settings)})
    assert [s.backend for s in route.steps] == ["fake", "local"]


def test_a_clip_with_an_end_frame_goes_only_to_models_that_can_end_on_one(tmp_path):
    """A landscape's Wan cannot take an end frame: skipped by name, then the table's end-frame models; no local."""
    keyed = Settings(data_dir=tmp_path, replicate_api_token="r8_x", fal_key="k")
    route = plan_route("landscape", probe(tmp_path, end_image_path=tmp_path / "end.png"), keyed)
    assert [s.label for s in route.steps] == [
        "replicate:kwaivgi/kling-v2.1", "fal:fal-ai/kling-video/v2.1/pro/image-to-video",
        "replicate:luma/ray-flash-2-540p", "fal:fal-ai/luma-dream-machine/ray-2-flash/image-to-video"]
    why = {s.label: reason for s, reason in route.skipped}
    assert "cannot end on a given frame" in why["replicate:wan-video/wan-2.2-i2v-a14b"]
    assert "duration 5s is not offered" in why["fal:fal-ai/minimax/hailuo-02/standard/image-to-video"]
    assert why["local"].startswith("local cannot end on a given frame")


def test_with_nothing_that_can_end_on_a_frame_the_route_is_refused_saying_so(settings, tmp_path):
    """No provider keys: no route for an end frame, and the refusal says what to leave out or set up."""
    with pytest.raises(InvalidParameters, match="nothing here can end a clip on a given frame; leave out"):
        plan_route("portrait", probe(tmp_path, end_image_path=tmp_path / "end.png"), settings)
