"""Backend health: providers that keep failing cool down, routing passes them over, one success heals."""

from __future__ import annotations

from backends.base import BackendUnavailable, ContentRefused, RateLimited
from worker import health


def test_three_outages_in_a_row_put_a_model_on_cooldown_and_a_success_clears_it(engine):
    """The third consecutive outage starts the cooldown; routing hears why; a delivery heals it."""
    outage = BackendUnavailable("503 from the provider", backend="replicate")
    for _ in range(2):
        health.record_failure(engine, "replicate", "kwaivgi/kling-v2.1", outage)
    assert health.checker(engine)("replicate", "kwaivgi/kling-v2.1") is None
    health.record_failure(engine, "replicate", "kwaivgi/kling-v2.1", outage)
    why = health.checker(engine)("replicate", "kwaivgi/kling-v2.1")
    assert why.startswith("cooling down for 60 s after 3 failure(s)") and "503" in why
    assert health.checker(engine)("replicate", "wan-video/wan-2.2-i2v-a14b") is None  # other models unaffected

    health.record_success(engine, "replicate", "kwaivgi/kling-v2.1")
    assert health.checker(engine)("replicate", "kwaivgi/kling-v2.1") is None
    assert health.report(engine)[0]["consecutive_failures"] == 0


def test_a_rate_limit_cools_down_at_once_for_as_long_as_the_provider_asked(engine):
    """429 with Retry-After: no new request before then."""
    health.record_failure(engine, "fal", None, RateLimited("slow down", backend="fal", retry_after=120))
    assert "cooling down for 120 s" in health.checker(engine)("fal", "any-model")


def test_failures_that_are_not_the_providers_fault_do_not_count(engine):
    """A moderation refusal says nothing about the provider's health."""
    for _ in range(5):
        health.record_failure(engine, "fal", None, ContentRefused("nsfw", backend="fal"))
    assert health.checker(engine)("fal", None) is None and health.report(engine) == []
