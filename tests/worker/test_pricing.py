"""Prices come from a TOML table: base plus per second, per backend, with per-model overrides."""

from __future__ import annotations

import pytest

from worker import pricing
from worker.pricing import PriceTable, PriceTableError, UnknownPrice
from worker.settings import Settings

TABLE = PriceTable.parse(
    {
        "backends": {
            "free": {"per_second": 0},
            "flat": {"base": 3, "per_second": 1},
            "odd": {"per_second": 1.1},
            "remote": {
                "base": 2,
                "per_second": 4,
                "models": {"vendor/fancy": {"per_second": 10}, "vendor/setup": {"base": 20}},
            },
        }
    }
)


@pytest.mark.parametrize(
    ("backend", "model", "duration", "credits"),
    [
        ("free", None, 10.0, 0),
        ("flat", None, 5.0, 8),
        ("flat", None, 0.0, 3),
        ("flat", None, 2.5, 6),  # 3 + 2.5 rounds up to 6
        ("odd", None, 10.0, 11),  # decimal arithmetic: 1.1 × 10 is 11, not 11.000000000000002 → 12
        ("remote", None, 5.0, 22),
        ("remote", "vendor/fancy", 5.0, 52),  # the override replaces per_second, keeps base
        ("remote", "vendor/setup", 5.0, 40),  # the override replaces base, keeps per_second
        ("remote", "vendor/unlisted", 5.0, 22),  # unlisted models pay the backend's rate
    ],
)
def test_price_table(backend, model, duration, credits):
    """base + per_second × duration, rounded up, with a model's override where it has one."""
    assert TABLE.price(backend, model, duration) == credits


def test_unknown_backend_names_the_known_ones():
    """A backend missing from the table is an error that lists what the table has."""
    with pytest.raises(UnknownPrice, match=r"'nope'.*flat, free, odd, remote"):
        TABLE.price("nope", None, 5.0)


@pytest.mark.parametrize("duration", [-1.0, float("nan"), float("inf")])
def test_duration_must_be_finite_and_not_negative(duration):
    with pytest.raises(ValueError, match="duration"):
        TABLE.price("flat", None, duration)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "expected only"),
        ({"backends": {}, "extra": 1}, "expected only"),
        ({"backends": {"x": {"per_secnd": 1}}}, "unknown keys"),
        ({"backends": {"x": {"per_second": -1}}}, "≥ 0"),
        ({"backends": {"x": {"per_second": "1"}}}, "must be a number"),
        ({"backends": {"x": {"per_second": True}}}, "must be a number"),
        ({"backends": {"x": {"models": {"m": {"base": -2}}}}}, 'models."m"'),
        ({"backends": {"x": 5}}, "must be a table"),
    ],
)
def test_malformed_tables_are_refused_when_loaded(data, message):
    """Typos and nonsense in a price file fail at load, naming where."""
    with pytest.raises(PriceTableError, match=message):
        PriceTable.parse(data)


def test_builtin_table_prices_the_shipped_backends():
    """The built-in table loads and prices the local and fake backends as documented."""
    table = pricing.load_prices()
    assert table.price("local", None, 5.0) == 0
    assert table.price("fake", None, 5.0) == 5
    assert table.price("replicate", "kwaivgi/kling-v2.1", 5.0) == 25


def test_prices_file_setting_replaces_the_table(tmp_path, monkeypatch):
    """ANIMABOT_PRICES_FILE points at an admin's own table."""
    path = tmp_path / "prices.toml"
    path.write_text('[backends.fake]\nbase = 1\nper_second = 2\n\n[backends.fake.models."m"]\nbase = 0\n')
    monkeypatch.setattr(pricing, "get_settings", lambda: Settings(prices_file=path))
    assert pricing.price("fake", None, 5.0) == 11
    assert pricing.price("fake", "m", 5.0) == 10
    with pytest.raises(UnknownPrice):
        pricing.price("local", None, 5.0)


def test_unreadable_file_is_a_table_error(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text("[backends.fake\n")
    with pytest.raises(PriceTableError, match="cannot read"):
        PriceTable.load(path)


def test_a_model_dearer_with_an_end_frame_and_a_still_priced_by_its_base():
    """`with_end_frame` replaces the model's rate only for clips that end on a given picture; a still is the base."""
    table = PriceTable.parse({"backends": {"remote": {"per_second": 5, "models": {
        "vendor/video": {"per_second": 5, "with_end_frame": {"per_second": 9}},
        "vendor/still": {"base": 2},
    }}}})
    assert table.price("remote", "vendor/video", 5.0) == 25
    assert table.price("remote", "vendor/video", 5.0, end_frame=True) == 45
    assert table.price("remote", "vendor/other", 5.0, end_frame=True) == 25  # no end-frame price: the usual one
    assert pricing.still_price("remote", "vendor/still", table=table) == 2
    with pytest.raises(PriceTableError, match="unknown keys"):
        PriceTable.parse({"backends": {"remote": {"models": {"m": {"with_end_frame": {"per_frame": 1}}}}}})


def test_the_built_in_table_prices_stills_and_klings_end_frames():
    """FLUX schnell 1 credit, FLUX dev 3, the fake's still 1; Kling on Replicate ending on a frame is pro's 9/s."""
    assert [pricing.still_price(b, m) for b, m in [("replicate", "black-forest-labs/flux-schnell"),
                                                    ("fal", "fal-ai/flux/dev"), ("fake", "still")]] == [1, 3, 1]
    assert pricing.price("replicate", "kwaivgi/kling-v2.1", 5.0, end_frame=True) == 45
