"""A tiny image-to-video Cog predictor that the real Cog server (coglet) runs in the tests.

It takes the inputs of a typical Cog i2v model (``image``, ``prompt``, ``negative_prompt``, ``num_frames``,
``fps``, ``seed``) and returns a real small H.264 MP4: a slow zoom into the image, made with
:func:`backends.animator.render`, at the image's own size (even, long side capped at 512). Run it without
Docker (the worker runs the ``python`` on ``PATH``, so the venv's ``bin`` must come first)::

    PATH=.venv/bin:$PATH COG_PREDICT_TYPE_STUB=tests/emulators/cog_predictor.py:Runner PORT=5078 \\
        python -m cog.server.http --host 127.0.0.1

:func:`start_cog_server` does that from a test and waits for ``READY``. A marker in the prompt makes
the prediction misbehave the way a real model does:

==============  ====================================================================================
``[slow]``      works for ``1.5`` seconds first (``[slow=3]`` for 3 s)
``[hang]``      works until canceled (cancellation is injected between bytecodes, so it stops at once)
``[fail]``      raises ``ValueError`` (a bug in the model: ``status: failed``)
``[oom]``       raises ``RuntimeError("CUDA out of memory ...")``
``[nsfw]``      raises a safety-checker refusal
``[crash]``     the worker process dies (``os._exit``), as when the GPU driver kills it
``[frozen]``    a clip whose frames never change
``[garbage]``   an ``.mp4`` file that is not a video
``[image]``     a PNG instead of a video
==============  ====================================================================================

Every run touches ``$COG_TEST_STATE_DIR/running-{seed}`` (the server's working directory, with
:func:`start_cog_server`) as soon as ``run()`` starts. Tests that cancel wait for it: coglet 0.23.1 loses
a cancel that arrives while it still prepares the inputs (it injects the ``CancelationException`` into the
thread-pool thread that decoded the ``data:`` URI, which ignores it; a second cancel is lost as well), so
such a prediction runs to its end.

What it does NOT cover: real model inputs beyond these (``resolution``, ``sample_steps`` ...) are
ignored; the server has no OpenAPI schema unless the test writes ``.cog/openapi_schema.json`` into its
working directory (:data:`OPENAPI_SCHEMA` is one; with it bad input is answered 422).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path as _Path

import numpy as np
from cog import BaseRunner, Input, Path
from PIL import Image

from backends import animator, video
from backends.base import CameraMove

HERE = _Path(__file__).resolve()
STUB = f"{HERE}:Runner"
MAX_SIDE = 512

#: A hand-written schema of this predictor's inputs; in ``.cog/openapi_schema.json`` of the server's
#: working directory it makes coglet validate input (422 on a bad one) and drop unknown keys.
OPENAPI_SCHEMA = {
    "openapi": "3.0.2",
    "info": {"title": "Cog", "version": "0.1.0"},
    "paths": {},
    "components": {"schemas": {
        "Input": {
            "type": "object",
            "title": "Input",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "uri", "title": "Image", "x-order": 0},
                "prompt": {"type": "string", "title": "Prompt", "default": "", "x-order": 1},
                "negative_prompt": {"type": "string", "title": "Negative Prompt", "default": "", "x-order": 2},
                "num_frames": {"type": "integer", "title": "Num Frames", "default": 16, "minimum": 1,
                               "maximum": 240, "x-order": 3},
                "fps": {"type": "integer", "title": "Fps", "default": 8, "minimum": 1, "maximum": 60, "x-order": 4},
                "seed": {"type": "integer", "title": "Seed", "default": 0, "x-order": 5},
            },
        },
        "Output": {"type": "string", "format": "uri", "title": "Output"},
    }},
}


class Runner(BaseRunner):
    """Zooms slowly into the picture; misbehaves on request (see the module docstring)."""

    def setup(self) -> None:
        """Nothing to load: the "model" is a camera move."""
        self.workdir = _Path(tempfile.mkdtemp(prefix="cog-predictor-"))

    def run(
        self,
        image: Path = Input(description="Start image"),  # noqa: B008 - the Cog idiom
        prompt: str = Input(description="What should move", default=""),
        negative_prompt: str = Input(description="What to avoid", default=""),
        num_frames: int = Input(description="Frames to make", default=16, ge=1, le=240),
        fps: int = Input(description="Frames per second", default=8, ge=1, le=60),
        seed: int = Input(description="Random seed", default=0),
    ) -> Path:
        """Make the clip (or misbehave as the prompt's marker says)."""
        print(f"run: prompt={prompt!r} num_frames={num_frames} fps={fps} seed={seed}", flush=True)
        if os.environ.get("COG_TEST_STATE_DIR"):  # tells a test that run() itself is running
            (_Path(os.environ["COG_TEST_STATE_DIR"]) / f"running-{seed}").touch()
        slow = re.search(r"\[slow(?:=([\d.]+))?\]", prompt)
        if slow:
            _work(float(slow.group(1) or 1.5))
        if "[hang]" in prompt:
            _work(3600.0)
        if "[fail]" in prompt:
            raise ValueError("the model failed on purpose ([fail])")
        if "[oom]" in prompt:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "[nsfw]" in prompt:
            raise RuntimeError("NSFW content detected by the safety checker; try a different image or prompt")
        if "[crash]" in prompt:
            os._exit(3)
        out = self.workdir / f"clip-{time.monotonic_ns()}.mp4"
        if "[garbage]" in prompt:
            out.write_bytes(b"\x00not a video at all\x00" * 100)
            return Path(out)
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"))
        if "[image]" in prompt:
            png = out.with_suffix(".png")
            Image.fromarray(rgb).save(png)
            return Path(png)
        h, w = rgb.shape[:2]
        scale = min(1.0, MAX_SIDE / max(w, h))
        width, height = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
        if "[frozen]" in prompt:
            still = np.ascontiguousarray(np.asarray(Image.fromarray(rgb).resize((width, height))))
            with video.VideoWriter(out, width=width, height=height, fps=fps) as writer:
                for _ in range(num_frames):
                    writer.write(still)
        else:
            animator.render(rgb, out, camera=CameraMove.ZOOM_IN, motion=2, duration=num_frames / fps, fps=fps,
                            width=width, height=height)
        return Path(out)


def _work(seconds: float) -> None:
    """Sleep in small steps, so that a cancel (an exception injected between bytecodes) stops it."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str, timeout: float = 1.0) -> dict:
    """The server's ``GET /health-check`` answer."""
    with urllib.request.urlopen(url + "/health-check", timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def start_cog_server(
    workdir: _Path, *, port: int = 0, schema: bool = False, upload_url: str = "", timeout: float = 20.0
) -> Iterator[str]:
    """Run the real Cog server on this predictor in ``workdir``; yield its base URL once ``READY``.

    ``schema`` writes :data:`OPENAPI_SCHEMA` so that coglet validates input. Raises ``RuntimeError`` with
    the server's log when it does not become ready (cog not installed, setup failed...).
    """
    port = port or free_port()
    if schema:
        (workdir / ".cog").mkdir(parents=True, exist_ok=True)
        (workdir / ".cog" / "openapi_schema.json").write_text(json.dumps(OPENAPI_SCHEMA))
    env = {**os.environ, "COG_PREDICT_TYPE_STUB": STUB, "PORT": str(port), "COG_TEST_STATE_DIR": str(workdir),
           "PATH": os.pathsep.join([str(_Path(sys.executable).parent), os.environ.get("PATH", "")])}
    args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
    if upload_url:
        args += ["--upload-url", upload_url]
    log = (workdir / "cog-server.log").open("wb")
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                status = health(url)["status"]
                if status == "READY":
                    break
            time.sleep(0.05)
        else:
            tail = (workdir / "cog-server.log").read_bytes()[-3000:].decode(errors="replace")
            raise RuntimeError(f"the Cog server did not become READY (last status {status!r}):\n{tail}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
