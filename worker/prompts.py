"""Builds the provider prompt from the user's intent, the camera move, the motion and the subject.

Templates and the known-failure rules live in ``worker/data/prompts.toml``, not in code:

    built = build_prompt("portrait", "she smiles", CameraMove.ZOOM_IN, motion=2, negative="blur")
    built.prompt     # 'she smiles, natural blink, subtle head movement, slow zoom in, natural motion'
    built.negative   # 'distorted face, warped eyes, extra fingers, identity change, blur'

:func:`steer` handles camera moves known to go wrong for a subject before any credit is spent: it
either swaps the move for a safe one (orbiting text) or returns a warning the user sees (orbiting a face).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from backends.base import CameraMove

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.toml"


@dataclass(frozen=True)
class BuiltPrompt:
    """The prompt and negative prompt sent to the provider."""

    prompt: str
    negative: str


@dataclass(frozen=True)
class Steering:
    """The camera move to use, and what the user should be told about it (empty when nothing)."""

    camera: CameraMove
    warning: str = ""
    changed: bool = False


@lru_cache(maxsize=4)
def load_templates(path: Path = PROMPTS_FILE) -> dict[str, Any]:
    """The parsed template file."""
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    missing = {c.value for c in CameraMove} - set(data.get("camera", {}))
    if missing:
        raise ValueError(f"{path.name}: no camera phrase for {sorted(missing)}")
    if "unknown" not in data.get("subject", {}):
        raise ValueError(f"{path.name}: [subject.unknown] is required (the default template)")
    return data


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(\s*,\s*)+", ", ", text)
    return text.strip(" ,")


def build_prompt(subject: str, intent: str, camera: CameraMove, *, motion: int, negative: str = "") -> BuiltPrompt:
    """The subject's template filled with the user's intent, camera phrase and motion phrase."""
    data = load_templates()
    template = data["subject"].get(subject) or data["subject"]["unknown"]
    values = {
        "intent": intent.strip(),
        "camera": data["camera"][camera.value],
        "motion": data["motion"].get(str(motion), ""),
        "negative": negative.strip(),
    }
    return BuiltPrompt(
        prompt=_tidy(template["prompt"].format(**values)),
        negative=_tidy(template.get("negative", "{negative}").format(**values)),
    )


def steer(subject: str, camera: CameraMove) -> Steering:
    """Swap or warn about a camera move known to fail on this subject."""
    for rule in load_templates().get("steer", []):
        if rule.get("subject") == subject and camera.value in rule.get("cameras", []):
            if "use" in rule:
                return Steering(CameraMove(rule["use"]), rule.get("message", ""), changed=True)
            return Steering(camera, rule.get("message", ""))
    return Steering(camera)
