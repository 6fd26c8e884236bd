"""Acknowledgement latency under a burst: 200 /animate at once through the Discord emulator.

The real bot (`animabot run`'s code, embedded mode, SQLite) is connected to the emulator; 200 members
each run /animate with a picture at the same moment. Measured, per interaction, by the emulator: time
from writing INTERACTION_CREATE to the bot's acknowledgement (the deferral), against Discord's 3 s;
then the time until all 200 clips are delivered in the channel. The jobs are real (fake backend
without latency, 1 s clips at 256 px), so their media work shares the 2 cores with the acknowledgements.

    python bench/discord_ack.py [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from emulators.discord_api import DiscordEmulator, point_discord_py_at  # noqa: E402
from PIL import Image  # noqa: E402

from bot import serve  # noqa: E402
from worker.db import init_db  # noqa: E402
from worker.settings import Settings  # noqa: E402


def picture() -> bytes:
    buf = io.BytesIO()
    with Image.open(ROOT / "bot" / "assets" / "astronaut.png") as im:
        im.convert("RGB").resize((256, 256)).save(buf, "PNG")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(n: int) -> None:
    data = picture()
    async with DiscordEmulator() as emu:
        guild = emu.add_guild("Bench")
        channel = emu.add_channel(guild, "general")
        members = [emu.add_member(guild, f"member{i}") for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp, point_discord_py_at(emu):
            settings = Settings(
                data_dir=Path(tmp), output_long_side=256, discord_token=emu.token, discord_dev_guild=str(guild.id),
                discord_cdn_hosts=["127.0.0.1"], daily_free_credits=5, poll_tick=0.1, web_port=0,
                default_duration=1.0, worker_concurrency=2, max_active_per_guild=10 * n,
            )
            db = init_db(settings)
            stop, ready = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(serve.run(db, settings, stop=stop, ready=lambda port: ready.set()))
            await asyncio.wait_for(ready.wait(), 60)
            t0 = time.perf_counter()
            inters = [emu.send_slash(m, channel, "animate", {"prompt": "slow push-in", "model": "fake"},
                                     attachments={"image": ("a.png", data)}) for m in members]
            await emu.wait_for(lambda: all(i.acked_type for i in inters), timeout=60)
            acked = time.perf_counter() - t0
            await emu.wait_for(
                lambda: sum("animation.mp4" in m.files for m in emu.messages_in(channel)) >= n, timeout=3600)
            delivered = time.perf_counter() - t0
            stop.set()
            await task
    latencies = [i.ack_latency * 1000 for i in inters]
    late = sum(i.ack_latency > 3 for i in inters)
    print(f"{n} interactions at once: deferral p50 {statistics.median(latencies):.0f} ms, "
          f"p99 {pct(latencies, 0.99):.0f} ms, max {max(latencies):.0f} ms, over 3 s: {late}; "
          f"all acknowledged after {acked:.2f} s; all {n} clips delivered after {delivered:.1f} s "
          f"({n / delivered:.2f} clips/s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    asyncio.run(main(parser.parse_args().n))
