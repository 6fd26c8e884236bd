"""The `animabot` command as a user runs it: a real process, real files, real exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backends import video

SAMPLE = Path(__file__).resolve().parents[2] / "bot" / "assets" / "astronaut.png"
ANIMABOT = shutil.which("animabot", path=str(Path(sys.executable).parent)) or "animabot"


def animabot(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ANIMABOT_")}
    environ.update(env)
    return subprocess.run([ANIMABOT, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def test_demo_writes_a_playable_mp4_and_a_one_line_summary(tmp_path):
    """`animabot demo` animates the bundled photograph at the default size and says where it went."""
    result = animabot("demo", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = tmp_path / "animabot-data" / "demo.mp4"
    info = video.probe(out)
    assert (info.width, info.height, round(info.fps)) == (1280, 1280, 24)
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    line = result.stdout.strip()
    assert len(line.splitlines()) == 1
    for part in (str(Path("animabot-data") / "demo.mp4"), "5.0s", "1280x1280", "backend=local", "took"):
        assert part in line
    assert re.search(r" \d+(\.\d+)? (KiB|MiB) ", line)
    first = next(video.read_frames(out)).astype(np.float64)
    photo = np.asarray(Image.open(SAMPLE).convert("RGB").resize((1280, 1280), Image.LANCZOS), np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((first - photo) ** 2))
    assert psnr > 30, f"first frame differs from the photograph (PSNR {psnr:.1f} dB)"


def test_animate_json_prints_exactly_one_object(tmp_path):
    """--json gives status, output, subject, backend, attempts, cost and error."""
    result = animabot("animate", str(SAMPLE), "--prompt", "gentle sway", "--camera", "pan-right",
                      "--duration", "1", "--aspect", "16:9", "--seed", "5", "-o", "clip.mp4", "--json",
                      cwd=tmp_path, ANIMABOT_OUTPUT_LONG_SIDE="320")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "succeeded" and data["error"] is None
    assert Path(data["output"]) == Path("clip.mp4") and (tmp_path / "clip.mp4").is_file()
    assert data["backend"] == "local" and data["subject"] == "portrait"
    assert data["attempts"] == [{"number": 1, "backend": "local", "seed": 5, "motion": 2,
                                 "verdict": "accepted", "reasons": [], "error": None}]
    assert data["cost"] == {"credits": 0, "usd": 0.0}
    assert video.probe(tmp_path / "clip.mp4").width == 320


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "vector"),
        (b"just some text", "not"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, content, expected):
    """Refusals are one human line on stderr, never a traceback."""
    bad = tmp_path / "upload.png"
    bad.write_bytes(content)
    result = animabot("animate", str(bad), "--prompt", "p", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr.lower()


def test_bad_input_with_json_reports_rejected(tmp_path):
    """--json still prints one object, with status rejected and the error code."""
    result = animabot("animate", str(tmp_path / "missing.jpg"), "--prompt", "p", "--json", cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_an_unsupported_combination_is_named(tmp_path):
    """A duration the backend cannot do is refused with what would work."""
    result = animabot("animate", str(SAMPLE), "--prompt", "p", "--backend", "fake", "--duration", "0.5",
                      "--json", cwd=tmp_path, ANIMABOT_OUTPUT_LONG_SIDE="320")
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["status"] == "rejected"
    assert "duration 0.5s is outside 1..30s" in data["error"]["message"]


def test_inspect_json_reports_validation_without_generating(tmp_path):
    """inspect says what validation concluded and writes no job."""
    result = animabot("inspect", str(SAMPLE), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert not (tmp_path / "animabot-data" / "media").exists()


def test_inspect_refusal_exits_2_with_a_json_error(tmp_path):
    """A refused picture: ok false, the code and the message."""
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (64, 64)).save(tiny)
    result = animabot("inspect", str(tiny), "--json", cwd=tmp_path)
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"]["code"] and "128" in data["error"]["message"]


def test_backends_lists_each_backend_with_usability_and_capabilities(tmp_path):
    """`animabot backends --json` shows local usable with its camera moves."""
    result = animabot("backends", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["backends"]}
    assert rows["local"]["usable"] is True
    assert "orbit-left" in rows["local"]["capabilities"]["cameras"]
    assert rows["local"]["capabilities"]["needs_network"] is False
    human = animabot("backends", cwd=tmp_path)
    assert "local" in human.stdout and "usable" in human.stdout


def _frozen_clip(path: Path) -> None:
    frame = np.asarray(Image.open(SAMPLE).convert("RGB").resize((320, 320)))
    with video.VideoWriter(path, width=320, height=320, fps=24) as writer:
        for _ in range(48):
            writer.write(frame)


def test_qc_accepts_a_good_clip_and_rejects_a_frozen_one_exiting_0_both_times(tmp_path):
    """`animabot qc --json` prints the verdict, its reasons and metrics, and exits 0 whatever it says."""
    made = animabot("animate", str(SAMPLE), "--prompt", "p", "--duration", "2", "-o", "good.mp4",
                    cwd=tmp_path, ANIMABOT_OUTPUT_LONG_SIDE="320")
    assert made.returncode == 0, made.stderr
    _frozen_clip(tmp_path / "frozen.mp4")

    good = animabot("qc", "good.mp4", "--source", str(SAMPLE), "--json", cwd=tmp_path)
    bad = animabot("qc", "frozen.mp4", "--source", str(SAMPLE), "--json", cwd=tmp_path)

    assert good.returncode == 0 and bad.returncode == 0
    good_v, bad_v = json.loads(good.stdout), json.loads(bad.stdout)
    assert good_v["accepted"] is True and good_v["reasons"] == []
    assert bad_v["accepted"] is False and "frozen" in bad_v["reasons"]
    assert set(good_v) == {"accepted", "reasons", "metrics"} and good_v["metrics"]


def test_qc_on_an_unreadable_file_exits_2(tmp_path):
    """Only a file that cannot be read makes qc exit 2."""
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    result = animabot("qc", "broken.mp4", "--json", cwd=tmp_path)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_inspect_shows_subject_faces_and_route(tmp_path):
    """inspect now says what the picture shows and where it would be sent."""
    result = animabot("inspect", str(SAMPLE), "--json", cwd=tmp_path)
    data = json.loads(result.stdout)
    assert data["subject"]["kind"] == "portrait" and data["subject"]["faces"]
    assert [s["backend"] for s in data["route"]["steps"]] == ["local"]
    assert {s["backend"] for s in data["route"]["skipped"]} >= {"replicate", "fal"}


def test_submit_without_a_picture_queues_a_prompt_only_job_when_something_can_paint(tmp_path):
    """No IMAGE: with a text-to-image model the job is queued at the clip's and the still's price; else refused."""
    painted = animabot("submit", "--prompt", "a lighthouse at dusk", "--backend", "fake", "--duration", "1",
                       "--member", "g1:u1", "--json", cwd=tmp_path, ANIMABOT_TEXT_TO_IMAGE="fake")
    assert painted.returncode == 0, painted.stderr
    receipt = json.loads(painted.stdout)
    assert receipt["ok"] and receipt["price_credits"] == 1 + 1

    refused = animabot("submit", "--prompt", "a lighthouse at dusk", cwd=tmp_path, ANIMABOT_TEXT_TO_IMAGE="none")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "needs a picture" in refused.stderr


def test_submit_with_an_end_frame_the_backend_cannot_honour_is_refused_by_name(tmp_path):
    """--end-frame goes through the same checks as Discord's end_frame: refused by name, with exit code 2."""
    refused = animabot("submit", str(SAMPLE), "--prompt", "p", "--backend", "local", "--end-frame", str(SAMPLE),
                       "--member", "g1:u1", cwd=tmp_path)
    assert refused.returncode == 2 and "local cannot end on a given frame" in refused.stderr
    accepted = animabot("submit", str(SAMPLE), "--prompt", "p", "--backend", "fake", "--duration", "1",
                        "--end-frame", str(SAMPLE), "--member", "g1:u1", "--json", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["ok"]
    missing = animabot("submit", str(SAMPLE), "--prompt", "p", "--end-frame", "nope.png", cwd=tmp_path)
    assert missing.returncode == 2 and "--end-frame nope.png is not a file" in missing.stderr
