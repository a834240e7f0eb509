"""``kontod runs show ID``: one run in full, a field a line, as ``/runs/{id}`` and the run's
page show it."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TextIO
from zoneinfo import ZoneInfo

import asyncpg

from kontod.cli import times
from kontod.cli.commands import visible
from kontod.scheduler import runlist


async def print_run(
    pool: asyncpg.Pool, run_id: int, tz: ZoneInfo, now: datetime, out: TextIO | None = None
) -> bool:
    """Run ``run_id`` in full, one field a line; False when there is no such run."""
    out = out or sys.stdout
    r = await runlist.run_detail(pool, run_id)
    if r is None:
        return False
    running = r.finished_at is None
    fields = [
        ("job", r.job),
        ("status", r.status),
        ("trigger", r.trigger),
        ("attempt", str(r.attempt)),
        ("tick", times.text(r.scheduled_for, tz)),
        ("started", times.text(r.started_at, tz)),
        ("finished", times.text(r.finished_at, tz)),
        ("duration", f"{r.duration_s(now):.1f} s" + (" so far" if running else "")),
        ("instance", r.instance),
        ("requested by", r.requested_by or "-"),
        ("reason", r.reason or "-"),
        ("heartbeat", times.text(r.heartbeat_at, tz)),
    ]
    if running:
        fields.append(("lease until", times.text(r.lease_until, tz)))
    counts = sorted(r.counts.items())
    fields += [("counts" if i == 0 else "", f"{k}={v}") for i, (k, v) in enumerate(counts)]
    if not counts:
        fields.append(("counts", "-"))
    # An error of several lines keeps them, each made safe for the terminal.
    lines = (r.error or "-").splitlines() or ["-"]
    fields += [("error" if i == 0 else "", line) for i, line in enumerate(lines)]
    print(f"run {r.id}", file=out)
    for label, value in fields:
        print(visible(f"  {label:<13} {value}").rstrip(), file=out)
    return True
