"""What the bot says: every line a member reads, rendered from job events and rows.

Plain functions of plain data, so the wording can be read, changed and tested in one place without
a Discord connection.
"""

from __future__ import annotations

from typing import Any

from worker.events import JobEvent

STATUS_ICONS = {
    "queued": "⏳", "started": "🔎", "painting": "🎨", "generating": "🎬", "retrying": "🔁", "post-processing": "🎞️",
    "succeeded": "✅", "failed": "⚠️", "canceled": "🛑",
}


def eta(seconds: float) -> str:
    """``about 40 s`` / ``about 3 min``."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    return f"about {round(seconds / 60)} min"


def status_line(event: JobEvent) -> str:
    """The job's status message for an event (queued, generating, retrying…)."""
    p = event.payload
    icon = STATUS_ICONS.get(event.kind, "•")
    text = {
        "queued": lambda: f"queued — position {p.get('position')}, {eta(p.get('eta_seconds', 0))}",
        "started": lambda: "looking at your picture…",
        "painting": lambda: f"painting your picture from the prompt with **{p.get('backend')}**…",
        "generating": lambda: (f"generating on **{p.get('backend')}** (attempt {p.get('attempt')} of "
                               f"{p.get('max_attempts')})"),
        "retrying": lambda: f"{p.get('reason', 'that one did not work')}, trying again — no credits spent",
        "post-processing": lambda: "smoothing to 24 fps and fitting the file…",
        "succeeded": lambda: "done",
        "failed": lambda: f"could not make this clip: {p.get('message')}",
        "canceled": lambda: "canceled — nothing was charged",
    }.get(event.kind, lambda: event.kind)()
    return f"{icon} {text}"


def result_caption(payload: dict[str, Any], *, user_id: str, link: str | None = None) -> str:
    """The message under a finished clip: the prompt, who asked, which model, the seed and the cost."""
    credits = payload.get("credits", 0)
    cost = "free" if not credits else f"{credits} credit{'s' if credits != 1 else ''}"
    model = payload.get("backend") or "?"
    if payload.get("model") and payload.get("backend") != "fake":
        model += f" · {payload['model']}"
    lines = [
        f"> {payload.get('prompt', '')[:300]}",
        f"by <@{user_id}> · {model} · seed {payload.get('seed')} · {cost}",
    ]
    if link:
        lines.append(f"the clip is too big to attach here: {link}")
    return "\n".join(lines)


def credits_summary(available: int, held: int, daily: int, history: list[Any]) -> str:
    """``/credits``: the balance, what is held for running jobs, today's grant and recent moves.

    ``history`` is :func:`worker.ledger.history` (newest first).
    """
    lines = [f"**{available}** credits available" + (f", {held} held for jobs in progress" if held else ""),
             f"free credits each day: {daily}"]
    if history:
        lines.append("recent:")
    for entry in history[:10]:
        t = entry.transfer
        job = f" (job {t.job_id})" if t.job_id else ""
        lines.append({
            "grant": f"`+{t.amount}` {'daily free credits' if t.id.startswith('daily:') else 'granted'}",
            "reserve": f"`-{t.amount}` held for a job{job}",
            "capture": f"`{t.amount}` charged{job}",
            "void": f"`+{t.amount}` refunded{job}",
        }.get(t.kind, f"{t.kind} {t.amount}"))
    return "\n".join(lines)


def details(job: Any, attempts: list[Any], lineage: list[int]) -> str:
    """The details button: every parameter of a job, its attempts and where it came from."""
    lines = [
        f"**job {job.id}** · {job.state}",
        f"prompt: {job.prompt}",
        f"camera {job.camera} · motion {job.motion} · {job.duration:g} s · aspect {job.aspect} · seed {job.seed}",
    ]
    if job.negative_prompt:
        lines.append(f"negative: {job.negative_prompt}")
    extra = job.detail or {}
    if paint := extra.get("paint"):
        lines.append(f"picture painted from the prompt by {paint.get('backend')}:{paint.get('model')}")
    if "end_frame" in extra:
        lines.append("ends on the end frame it was given")
    lines.append(f"subject: {job.subject or '?'} · backend: {job.backend or '?'} · {job.price_credits} credits")
    for a in attempts:
        why = ", ".join(a.reasons) if a.reasons else (a.error_code or "")
        why = f" ({why})" if why else ""
        lines.append(f"attempt {a.number}: {a.backend} seed {a.seed} → {a.verdict or a.state}{why}")
    if lineage:
        lines.append("made from: " + " ← ".join(f"job {j}" for j in lineage))
    return "\n".join(lines)
