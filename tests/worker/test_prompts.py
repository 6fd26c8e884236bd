"""Prompt construction per subject and the known-failure steering of camera moves."""

from __future__ import annotations

import pytest

from backends.base import CameraMove
from worker.prompts import build_prompt, load_templates, steer


def test_a_portrait_asks_for_natural_blinks():
    """The portrait template adds face-friendly motion and face-failure negatives."""
    built = build_prompt("portrait", "she smiles", CameraMove.ZOOM_IN, motion=2, negative="blur")
    assert built.prompt == "she smiles, natural blink, subtle head movement, slow zoom in, natural motion"
    assert built.negative.startswith("distorted face") and built.negative.endswith(", blur")


def test_text_heavy_pictures_ask_to_keep_text_sharp():
    """Text-heavy pictures get 'keep text sharp and static'."""
    built = build_prompt("text", "a shop sign", CameraMove.PAN_LEFT, motion=1)
    assert "keep text sharp and static" in built.prompt and "camera pans left" in built.prompt
    assert "garbled text" in built.negative


@pytest.mark.parametrize("motion", range(5))
def test_motion_strength_is_spelled_out(motion):
    """Every motion level has its own phrase."""
    assert load_templates()["motion"][str(motion)] in build_prompt("other", "x", CameraMove.STATIC,
                                                                    motion=motion).prompt


def test_unknown_subjects_use_the_default_template_and_empty_parts_are_tidied():
    """No dangling commas when the user gives no negative prompt."""
    built = build_prompt("spaceship", "  waves ", CameraMove.STATIC, motion=0)
    assert built.prompt == "waves, static camera, almost still, very subtle motion"
    assert built.negative == "flicker, distortion"


def test_orbiting_text_is_steered_to_a_zoom():
    """No orbit on text-heavy pictures: the move is swapped and the user is told why."""
    steering = steer("text", CameraMove.ORBIT_LEFT)
    assert steering.camera is CameraMove.ZOOM_IN and steering.changed
    assert "warp" in steering.warning


def test_orbiting_a_face_is_warned_about_but_kept():
    """Orbit on a portrait stays, with a warning."""
    steering = steer("portrait", CameraMove.ORBIT_RIGHT)
    assert steering.camera is CameraMove.ORBIT_RIGHT and not steering.changed and steering.warning


def test_safe_moves_pass_untouched():
    """A pan on a landscape needs no steering."""
    assert steer("landscape", CameraMove.PAN_LEFT).warning == ""
