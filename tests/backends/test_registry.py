"""The backend registry: built-ins and plugins through one entry-point group, and declaration checks."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from backends import registry
from backends.base import (
    Aspect,
    Backend,
    BackendDeclarationError,
    CameraMove,
    Capabilities,
    GenerationRequest,
    Usability,
)
from backends.fake import FakeBackend
from worker.settings import Settings

CAPS = Capabilities(cameras=frozenset({CameraMove.ZOOM_IN}), durations=(1.0, 5.0),
                    aspects=frozenset({Aspect.LANDSCAPE}), fps=24)


@pytest.fixture
def fresh_registry():
    """Forget what the registry loaded, before and after the test."""
    registry._classes = None
    yield
    registry._classes = None


def test_builtins_are_loaded_through_the_entry_point_group():
    """local and fake come from `animabot.backends` entry points, like any plugin."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=registry.GROUP)}
    assert {"local", "fake"} <= names
    assert {"local", "fake"} <= set(registry.backend_classes())


def test_unknown_backend_names_the_installed_ones():
    """Asking for a missing backend says which ones exist."""
    with pytest.raises(registry.UnknownBackend, match=r"unknown backend 'nope'; installed: .*local"):
        registry.get_backend_class("nope")


@pytest.mark.parametrize(
    ("attrs", "complaint"),
    [
        ({"name": "Bad Name", "capabilities": CAPS}, "name must be a lowercase slug"),
        ({"name": "nocaps", "capabilities": None}, "capabilities must be a Capabilities instance"),
        ({"name": "nocams", "capabilities": Capabilities(
            cameras=frozenset(), durations=(1, 5), aspects=frozenset({Aspect.SQUARE}), fps=24)},
         "cameras must be a non-empty set"),
        ({"name": "baddur", "capabilities": Capabilities(
            cameras=frozenset({CameraMove.STATIC}), durations=(5, 1), aspects=frozenset({Aspect.SQUARE}),
            fps=24)},
         "durations must be"),
    ],
)
def test_a_wrongly_declared_backend_fails_when_its_class_is_defined(attrs, complaint):
    """Declaration mistakes surface at import time, with the class and the problem named."""
    with pytest.raises(BackendDeclarationError, match=complaint):
        type("Broken", (FakeBackend,), {"description": "x", **attrs})


def test_registered_adds_a_backend_for_the_block_only():
    """`registered` makes a test backend visible by name, then removes it."""
    custom = type("Custom", (FakeBackend,), {"name": "custom-test", "description": "t", "capabilities": CAPS})
    with registry.registered(custom):
        assert registry.get_backend_class("custom-test") is custom
    with pytest.raises(registry.UnknownBackend):
        registry.get_backend_class("custom-test")


def _install_plugin(tmp_path: Path, dist: str, module: str, source: str, entry: str) -> None:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[animabot.backends]\n{entry}\n")


def test_third_party_plugins_load_and_a_broken_one_is_reported(tmp_path, monkeypatch, fresh_registry):
    """A good plugin package is found; a wrongly declared one is listed as broken, not fatal."""
    _install_plugin(tmp_path, "good_plugin", "good_plugin", """
        from backends.fake import FakeBackend
        class Good(FakeBackend):
            name = "good"
            description = "a third-party backend"
    """, "good = good_plugin:Good")
    _install_plugin(tmp_path, "bad_plugin", "bad_plugin", """
        from backends.fake import FakeBackend
        class Bad(FakeBackend):
            name = "Not A Slug"
            description = "declared wrongly"
    """, "bad = bad_plugin:Bad")
    monkeypatch.syspath_prepend(str(tmp_path))

    classes = registry.backend_classes()

    assert classes["good"].description == "a third-party backend"
    assert "local" in classes
    assert "bad" not in classes
    failure = registry.load_failures()["bad"]
    assert "BackendDeclarationError" in failure and "name must be a lowercase slug" in failure
    sys.modules.pop("good_plugin", None)
    sys.modules.pop("bad_plugin", None)


@pytest.mark.parametrize("name", sorted(registry.backend_classes()))
def test_every_installed_backend_declares_itself_fully(name, tmp_path):
    """Meta-test: each backend says whether it is usable and judges requests against its capabilities."""
    cls = registry.get_backend_class(name)
    assert cls.name == name and cls.description
    assert isinstance(cls.check_usable(Settings(data_dir=tmp_path)), Usability)
    _, hi = cls.capabilities.durations
    request = GenerationRequest(image_path=tmp_path / "x.png", prompt="p", output_dir=tmp_path, duration=hi + 1)
    assert any("duration" in r for r in cls(Settings(data_dir=tmp_path)).refusals(request))


def test_a_backend_needing_a_setting_says_which_to_set(tmp_path):
    """Usability names the environment variable that would make a backend usable."""
    needy = type("Needy", (FakeBackend,), {
        "name": "needy", "description": "n",
        "capabilities": Capabilities(cameras=frozenset({CameraMove.STATIC}), durations=(1, 5),
                                     aspects=frozenset({Aspect.SQUARE}), fps=24, settings=("fal_key",))})
    assert needy.check_usable(Settings(data_dir=tmp_path)) == Usability(False, "set ANIMABOT_FAL_KEY")
    assert needy.check_usable(Settings(data_dir=tmp_path, fal_key="k")).usable


def test_backend_subclasses_must_implement_the_protocol():
    """A backend missing one of the four calls cannot be instantiated."""
    class Partial(Backend):
        name = "partial"
        description = "no calls"
        capabilities = CAPS

    with pytest.raises(TypeError, match="abstract"):
        Partial(None)
