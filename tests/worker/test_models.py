"""The job state machine: the moves a job may make, and the ones it may not."""

from __future__ import annotations

import pytest

from worker.models import FINAL_STATES, TRANSITIONS, IllegalTransition, Job, JobState

HAPPY_PATH = [
    JobState.VALIDATING, JobState.GENERATING, JobState.CHECKING, JobState.POST_PROCESSING,
    JobState.DELIVERING, JobState.SUCCEEDED,
]


def test_a_job_walks_the_happy_path_to_succeeded():
    """queued → validating → generating → checking → post-processing → delivering → succeeded."""
    job = Job()
    for state in HAPPY_PATH:
        job.advance(state)
    assert job.job_state is JobState.SUCCEEDED and job.finished_at is not None


def test_a_rejected_output_goes_back_to_generating():
    """checking may return to generating: that is the retry loop."""
    job = Job(state=JobState.CHECKING.value)
    job.advance(JobState.GENERATING)
    assert job.job_state is JobState.GENERATING


@pytest.mark.parametrize("state", [s for s in JobState if not s.terminal])
@pytest.mark.parametrize("end", [JobState.FAILED, JobState.CANCELED])
def test_any_unfinished_job_can_fail_or_be_canceled(state, end):
    """Failure and cancel are reachable from every unfinished state."""
    job = Job(state=state.value)
    job.advance(end)
    assert job.job_state is end and job.finished_at is not None


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
@pytest.mark.parametrize("target", list(JobState))
def test_a_finished_job_never_moves_again(final, target):
    """succeeded, failed and canceled are final (staying put is allowed, moving is not)."""
    job = Job(state=final.value)
    if target == final:
        job.advance(target)
    else:
        with pytest.raises(IllegalTransition, match=f"cannot go from {final.value} to {target.value}"):
            job.advance(target)


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (JobState.QUEUED, JobState.GENERATING),
        (JobState.VALIDATING, JobState.SUCCEEDED),
        (JobState.GENERATING, JobState.DELIVERING),
        (JobState.POST_PROCESSING, JobState.GENERATING),
    ],
)
def test_skipping_stages_is_refused(start, target):
    """A job cannot jump over the stages between two states."""
    with pytest.raises(IllegalTransition):
        Job(state=start.value).advance(target)


def test_every_state_has_its_moves_declared():
    """The transition table covers every state."""
    assert set(TRANSITIONS) == set(JobState)
