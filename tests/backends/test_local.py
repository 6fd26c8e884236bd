"""The local backend says by name what it cannot do: end on a given frame, or paint from text."""

from __future__ import annotations

import pytest
from PIL import Image

from backends.base import GenerationRequest, ImageRequest, UnsupportedRequest
from backends.local import LocalBackend
from worker.settings import Settings


async def test_an_end_frame_is_refused_by_name_with_the_models_that_can(tmp_path):
    """A camera move over one picture cannot arrive at another: refused, naming the installed models that can."""
    picture = tmp_path / "p.png"
    Image.new("RGB", (320, 180), (10, 20, 30)).save(picture)
    request = GenerationRequest(image_path=picture, prompt="p", output_dir=tmp_path, end_image_path=picture)
    [why] = LocalBackend.capabilities.refusals(request)  # what routing asks
    assert why.startswith("local cannot end on a given frame")
    assert "replicate:kwaivgi/kling-v2.1" in why and "fal:fal-ai/kling-video/v2.1/pro/image-to-video" in why
    with pytest.raises(UnsupportedRequest, match="local cannot end on a given frame"):
        await LocalBackend(Settings(data_dir=tmp_path)).submit(request)


async def test_the_offline_animator_cannot_paint_a_picture(tmp_path):
    """No model weights ship, so it advertises no text-to-image model and refuses to pretend."""
    assert LocalBackend.image_models == () and LocalBackend.image_model(None) is None
    with pytest.raises(UnsupportedRequest, match="local cannot paint a picture from text"):
        await LocalBackend(Settings(data_dir=tmp_path)).imagine(ImageRequest(prompt="p", output_path=tmp_path / "x"))
