"""One scheduled run of ``daily-snapshots`` in a process of its own, as the daemon makes it.

``python -m bench.job_process --tick 2026-01-01T02:00:00+00:00`` does what ``kontod jobs run
daily-snapshots`` does (settings from the environment, the command's own pool and migrations,
the jobs as ``kontod.jobs`` declares them, the real ``Runner`` claiming and recording the run),
except that the run is the scheduled tick given instead of a manual run at the current time:
``kontod jobs run`` always snapshots today, and every timed pass needs a date of its own.

It prints one JSON line: the run's id and status, and the process's peak and current resident
memory (``VmHWM``, ``VmRSS`` of ``/proc/self/status``) at the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path

import aiohttp

from kontod.cli.main import _database
from kontod.config import load_settings
from kontod.jobs import SNAPSHOTS, declare_jobs
from kontod.logs import configure
from kontod.scheduler.runner import Runner, Skipped


def memory_kib(pid: int | str = "self") -> dict[str, int]:
    """``VmHWM`` (peak) and ``VmRSS`` (now) of a process, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0])
    return found


async def _run(tick: datetime) -> dict[str, object]:
    settings = load_settings()
    configure(settings.logging.format, settings.logging.level)
    async with _database(settings) as pool, aiohttp.ClientSession() as http:
        jobs = declare_jobs(settings, pool, http)
        run = settings.runner
        runner = Runner(pool, jobs, run.tz, run.instance, lease_s=run.lease.total_seconds())
        await runner.prepare()
        try:
            outcome = await runner.trigger(SNAPSHOTS, "schedule", tick)
            if isinstance(outcome, Skipped):
                return {"skipped": outcome.reason}
            status = await outcome.task
        finally:
            await runner.stop(run.shutdown_timeout.total_seconds())
        return {"run_id": outcome.run_id, "status": status, **memory_kib()}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_process")
    parser.add_argument("--tick", required=True, type=datetime.fromisoformat)
    args = parser.parse_args()
    result = asyncio.run(_run(args.tick))
    print(json.dumps(result), flush=True)
    return 0 if result.get("status") == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
