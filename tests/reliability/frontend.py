"""A stand-in front end, run as its own process by ``test_frontend_outage.py``.

    python tests/reliability/frontend.py DATABASE_URL POSTS_FILE [--crash-after N]

It consumes the job event stream with ``worker.events.consume`` exactly as a front end does, and
"posts" every event it handles by appending one JSON line to ``POSTS_FILE`` (flushed to disk before
the handler returns): ``{"nonce": event id, "job_id", "kind", "final"}``. The nonce is the event id,
as the Discord front end sends it, so a channel that deduplicates by nonce shows each post once.

With ``--crash-after N`` the process dies (``os._exit``, no clean-up, like ``kill -9``) right after
posting its N-th result (final event) and before ``consume`` confirms it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from worker import events
from worker.db import make_engine
from worker.events import JobEvent

CRASH_EXIT = 17


async def main() -> None:
    """Consume events until killed (or until the planned crash)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("database_url")
    parser.add_argument("posts")
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    engine = make_engine(args.database_url)
    results = 0

    async def post(event: JobEvent) -> None:
        nonlocal results
        line = {"nonce": event.id, "job_id": event.job_id, "kind": event.kind, "final": event.final}
        with open(args.posts, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if event.final:
            results += 1
            if results == args.crash_after:
                os._exit(CRASH_EXIT)  # posted, not yet confirmed

    await events.consume(engine, post, stop=asyncio.Event(), every=0.1)


if __name__ == "__main__":
    asyncio.run(main())
