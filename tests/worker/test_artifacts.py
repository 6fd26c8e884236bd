"""Artifact names say which job, stage and parameters produced each file."""

from __future__ import annotations

import pytest

from worker.artifacts import STAGES, artifact_name, artifact_path


def test_generate_artifacts_carry_backend_camera_motion_seed_and_attempt():
    """The generate stage's file name encodes everything that produced it."""
    name = artifact_name("generate", "local", "zoom-in", "m2", "s42", "a1", ext="mp4")
    assert name == "06-generate-local-zoom-in-m2-s42-a1.mp4"


def test_stage_numbers_follow_the_pipeline_order():
    """Files sort in the order the pipeline made them."""
    names = [artifact_name(stage, ext="x") for stage in STAGES]
    assert names == sorted(names)


def test_paths_live_in_one_folder_per_job(tmp_path):
    """Every artifact of job 17 is under media/job-17/."""
    path = artifact_path(tmp_path, 17, "encode", "h264", "10MiB", ext="mp4")
    assert path == tmp_path / "job-17" / "09-encode-h264-10MiB.mp4"
    assert path.parent.is_dir()


def test_unsafe_characters_are_replaced():
    """Parameters cannot escape the job folder or break the name."""
    assert artifact_name("generate", "../evil/model:v1", ext="mp4") == "06-generate-evil_model_v1.mp4"


def test_unknown_stages_are_refused():
    """A typo in a stage name fails loudly."""
    with pytest.raises(ValueError, match="unknown stage"):
        artifact_name("genrate", ext="mp4")
