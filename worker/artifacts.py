"""Where every file of a job goes, named so a person can tell at a glance where it came from.

One folder per job under the media folder; one file per stage output, numbered in pipeline order and
carrying the parameters that produced it::

    media/job-17/00-paint-replicate-black-forest-labs_flux-schnell-s42.png   a prompt-only job's picture
    media/job-17/01-validate-source.jpg                     the upload (or that picture), byte for byte
    media/job-17/03-enhance-1280x720-crop.png               fitted to the target size
    media/job-17/06-generate-local-zoom-in-m2-s42-a1.mp4    attempt 1 of the generate stage
    media/job-17/08-post-process-24fps.mp4
    media/job-17/09-encode-h264-10MiB.mp4                   fits the delivery byte limit
"""

from __future__ import annotations

import re
from pathlib import Path

#: Pipeline stages in order; the number in a file name is the stage's position here.
STAGES = (
    "validate",
    "classify",
    "enhance",
    "route",
    "prompt",
    "generate",
    "check",
    "post-process",
    "encode",
    "store",
)
#: Stages only some jobs run, before the numbered ones (their files are numbered 00): a prompt-only job
#: paints its picture first.
EARLY_STAGES = ("paint",)

_UNSAFE = re.compile(r"[^A-Za-z0-9=+-]+")


def job_dir(media: Path, job_id: int) -> Path:
    """The folder of job ``job_id`` (created if missing)."""
    path = media / f"job-{job_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_name(stage: str, *parts: object, ext: str) -> str:
    """``NN-stage-part-part.ext`` with the stage's number and filesystem-safe parts.

    >>> artifact_name("generate", "local", "zoom-in", "m2", "s42", "a1", ext="mp4")
    '06-generate-local-zoom-in-m2-s42-a1.mp4'
    """
    if stage not in STAGES and stage not in EARLY_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    number = STAGES.index(stage) + 1 if stage in STAGES else 0
    words = [f"{number:02d}", stage]
    words += [_UNSAFE.sub("_", str(p)).strip("_") for p in parts if str(p)]
    return "-".join(words) + "." + ext.lstrip(".")


def artifact_path(media: Path, job_id: int, stage: str, *parts: object, ext: str) -> Path:
    """Full path of a stage's artifact for a job."""
    return job_dir(media, job_id) / artifact_name(stage, *parts, ext=ext)
