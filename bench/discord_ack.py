"""Acknowledgement latency under a burst: 200 /animate at once through the Discord emulator.

The real bot is `animabot run` as an owner starts it (embedded mode, SQLite), in a process of its own,
connected to the Discord emulator in this process; 200 members each run /animate with a picture at the
same moment. Measured, per interaction, by the emulator: time from writing INTERACTION_CREATE to the
bot's acknowledgement (the deferral), against Discord's 3 s; then the time until all 200 clips are
delivered in the channel. The jobs are real (fake backend without latency, 1 s clips at 256 px), so
their media work shares the 2 cores with the acknowledgements.

    python bench/discord_ack.py [--n 200] [--python PATH --root DIR]   # another checkout, to compare
    python bench/discord_ack.py --profile out.txt   # py-spy's collapsed stacks of the bot during the burst
    python bench/discord_ack.py --acks-only         # stop after the acknowledgements (quick comparisons)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from emulators.discord_api import DiscordEmulator  # noqa: E402
from PIL import Image  # noqa: E402


def picture() -> bytes:
    buf = io.BytesIO()
    with Image.open(ROOT / "bot" / "assets" / "astronaut.png") as im:
        im.convert("RGB").resize((256, 256)).save(buf, "PNG")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bot_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(n: int, python: str, root: Path, profile: Path | None, acks_only: bool) -> None:
    data = picture()
    async with DiscordEmulator() as emu:
        guild = emu.add_guild("Bench")
        channel = emu.add_channel(guild, "general")
        members = [emu.add_member(guild, f"member{i}") for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMABOT_")} | {
                "DISCORD_API_BASE": emu.api_base, "DISCORD_GATEWAY_URL": emu.gateway_url,
                "ANIMABOT_DATA_DIR": tmp, "ANIMABOT_DISCORD_TOKEN": emu.token,
                "ANIMABOT_DISCORD_DEV_GUILD": str(guild.id), "ANIMABOT_DISCORD_CDN_HOSTS": json.dumps(["127.0.0.1"]),
                "ANIMABOT_OUTPUT_LONG_SIDE": "256", "ANIMABOT_DAILY_FREE_CREDITS": "5", "ANIMABOT_POLL_TICK": "0.1",
                "ANIMABOT_WEB_PORT": "0", "ANIMABOT_DEFAULT_DURATION": "1", "ANIMABOT_WORKER_CONCURRENCY": "2",
                "ANIMABOT_MAX_ACTIVE_PER_GUILD": str(10 * n),
            }
            log = Path(tmp) / "bot.log"
            with log.open("wb") as out:
                bot = await asyncio.create_subprocess_exec(python, "-m", "bot.cli", "run", cwd=root, env=env,
                                                           stdout=out, stderr=out)
            try:
                await emu.wait_for(lambda: "/animate is ready" in log.read_text(errors="replace")
                                   or bot.returncode is not None, timeout=120)
                if bot.returncode is not None:
                    sys.exit(f"the bot stopped:\n{log.read_text()}")
                await asyncio.sleep(1.0)  # let start-up settle (command sync, the first reaper round)
                spy = None
                if profile is not None:  # py-spy samples the bot for the burst (pip install py-spy)
                    spy = await asyncio.create_subprocess_exec(
                        str(Path(python).with_name("py-spy")), "record", "--pid", str(bot.pid), "--duration", "3",
                        "--rate", "500", "--format", "raw", "--threads", "--gil", "--output", str(profile),
                        stdout=asyncio.subprocess.DEVNULL)
                    await asyncio.sleep(1.0)
                cpu0, t0, emu_cpu0 = bot_cpu(bot.pid), time.perf_counter(), time.process_time()
                inters = [emu.send_slash(m, channel, "animate", {"prompt": "slow push-in", "model": "fake"},
                                         attachments={"image": ("a.png", data)}) for m in members]
                await emu.wait_for(lambda: all(i.acked_type for i in inters), timeout=60)
                acked, ack_cpu = time.perf_counter() - t0, bot_cpu(bot.pid) - cpu0
                emu_cpu = time.process_time() - emu_cpu0
                if spy is not None:
                    await spy.wait()
                delivered, cpu = float("nan"), float("nan")
                if not acks_only:
                    await emu.wait_for(
                        lambda: sum("animation.mp4" in m.files for m in emu.messages_in(channel)) >= n, timeout=3600)
                    delivered, cpu = time.perf_counter() - t0, bot_cpu(bot.pid) - cpu0
            finally:
                bot.terminate()
                await bot.wait()
    latencies = [i.ack_latency * 1000 for i in inters]
    print(f"first acknowledgement after {min(latencies):.0f} ms; the bot used {ack_cpu:.2f} CPU-s until the last, "
          f"the emulator (this process) {emu_cpu:.2f}")
    late = sum(i.ack_latency > 3 for i in inters)
    print(f"{n} interactions at once: deferral p50 {statistics.median(latencies):.0f} ms, "
          f"p90 {pct(latencies, 0.90):.0f} ms, p99 {pct(latencies, 0.99):.0f} ms, max {max(latencies):.0f} ms, "
          f"over 3 s: {late}; all acknowledged after {acked:.2f} s; all {n} clips delivered after "
          f"{delivered:.1f} s ({n / delivered:.2f} clips/s); bot process CPU {cpu:.1f} s "
          f"({cpu / n * 1000:.0f} ms per job, ffmpeg children excluded until reaped)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--python", default=sys.executable, help="the bot's Python (another checkout's venv)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose bot is measured")
    parser.add_argument("--profile", type=Path, help="write py-spy's samples of the bot during the burst here")
    parser.add_argument("--acks-only", action="store_true", help="stop once every interaction is acknowledged")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.python, args.root, args.profile, args.acks_only))
