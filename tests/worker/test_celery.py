"""The Celery configuration avoids the known traps of Celery on Redis (reference: reliability.md §1)."""

from __future__ import annotations

from worker.celery import MAX_COUNTDOWN, TASK_HARD_LIMIT, app, celery_config
from worker.settings import Settings


def test_a_killed_workers_message_goes_back_to_the_queue():
    """acks_late alone loses killed tasks; reject_on_worker_lost requeues them; prefetch holds nothing extra."""
    config = celery_config(Settings())
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1


def test_one_visibility_timeout_everywhere_far_above_any_task():
    """Redis redelivers unacknowledged messages after visibility_timeout, even while they still run."""
    config = celery_config(Settings())
    timeouts = {config["visibility_timeout"], config["broker_transport_options"]["visibility_timeout"],
                config["result_backend_transport_options"]["visibility_timeout"]}
    assert timeouts == {3 * TASK_HARD_LIMIT} and config["task_time_limit"] == TASK_HARD_LIMIT
    assert MAX_COUNTDOWN < 3 * TASK_HARD_LIMIT


def test_workers_reconnect_forever_and_stop_long_tasks_on_connection_loss():
    """After a Redis restart the worker resumes by itself; a task cut off from the broker is not run twice."""
    config = celery_config(Settings())
    assert config["broker_connection_max_retries"] is None and config["broker_connection_retry_on_startup"]
    assert config["worker_cancel_long_running_tasks_on_connection_loss"]


def test_beat_runs_the_pollers_clock_the_reaper_and_the_daily_grant_from_settings():
    """Periodic work is Celery beat's, at the configured intervals."""
    config = celery_config(Settings(poll_tick=0.5, reap_interval=7))
    schedule = {name: entry["task"] for name, entry in config["beat_schedule"].items()}
    assert schedule == {"poll": "animabot.poll", "reap": "animabot.reap", "daily-grant": "animabot.daily_grant"}
    assert config["beat_schedule"]["reap"]["schedule"].total_seconds() == 7


def test_periodic_work_has_its_own_queue_so_a_backlog_cannot_starve_the_polls():
    """Polls, the reaper and the daily grant are routed apart from the work messages."""
    config = celery_config(Settings())
    assert {task: route["queue"] for task, route in config["task_routes"].items()} == {
        "animabot.poll": "animabot.periodic", "animabot.reap": "animabot.periodic",
        "animabot.daily_grant": "animabot.periodic"}
    assert config["task_default_queue"] == "animabot"


def test_the_app_registers_its_tasks_under_stable_names():
    """Workers and producers of any version agree on the task names."""
    assert {"animabot.work", "animabot.poll", "animabot.reap", "animabot.daily_grant"} <= set(app.tasks)
