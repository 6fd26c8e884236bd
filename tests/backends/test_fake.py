"""The fake backend's still painter and end frames: what tests and the offline demo rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backends.base import (
    Aspect,
    BackendUnavailable,
    ContentRefused,
    GenerationRequest,
    ImageRequest,
    InvalidRequest,
)
from backends.fake import FakeBackend, paint_picture
from worker.settings import Settings


@pytest.fixture
def fake(tmp_path) -> FakeBackend:
    return FakeBackend(Settings(data_dir=tmp_path))


async def test_the_fake_paints_the_same_picture_for_the_same_prompt_and_seed(fake, tmp_path):
    """A deterministic, textured picture of the asked size; another prompt or seed gives another one."""
    first = await fake.imagine(ImageRequest(prompt="a lighthouse", output_path=tmp_path / "a.png",
                                            aspect=Aspect.PORTRAIT, width=288, height=512, seed=4))
    again = await fake.imagine(ImageRequest(prompt="a lighthouse", output_path=tmp_path / "b.png",
                                            width=288, height=512, seed=4))
    pixels = np.asarray(Image.open(first.image_path))
    assert pixels.shape == (512, 288, 3) and (first.width, first.height) == (288, 512)
    assert np.array_equal(pixels, np.asarray(Image.open(again.image_path)))
    assert pixels.std() > 20  # texture enough for a camera move to show
    assert not np.array_equal(paint_picture("a lighthouse", 5, 64, 36), paint_picture("a lighthouse", 4, 64, 36))
    assert not np.array_equal(paint_picture("a harbour", 4, 64, 36), paint_picture("a lighthouse", 4, 64, 36))
    assert first.cost_usd == 0.0 and first.metadata["fake"] is True


@pytest.mark.parametrize(("script", "attempt", "error"), [
    ("fail,ok", 1, BackendUnavailable),
    ("invalid", 1, InvalidRequest),
    ("refuse", 1, ContentRefused),
    ("fail,ok", 2, None),
])
async def test_a_scripted_still_fails_as_told_on_each_try(fake, tmp_path, script, attempt, error):
    """The model names one outcome per try, like the clips' scripts."""
    request = ImageRequest(prompt="p", output_path=tmp_path / "s.png", width=64, height=36, model=script,
                           attempt=attempt)
    if error is None:
        assert (await fake.imagine(request)).image_path.is_file()
    else:
        with pytest.raises(error):
            await fake.imagine(request)
    assert FakeBackend.image_model(script) == script and FakeBackend.image_model(None) == "still"
    assert FakeBackend.image_model("flux") is None


async def test_the_fake_accepts_an_end_frame(fake, tmp_path):
    """No refusal; the handle notes the end frame it was given."""
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 36), (10, 20, 30)).save(picture)
    request = GenerationRequest(image_path=picture, prompt="p", output_dir=tmp_path, end_image_path=picture)
    assert fake.refusals(request) == []
    handle = await fake.submit(request)
    assert handle.data["request"]["end_image"] == str(picture)
    assert Path(handle.data["request"]["image"]) == picture
