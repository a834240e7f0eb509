"""A run's page, ``/runs/{id}`` as a browser asks for it: everything ``kontod runs show`` prints.

Server-rendered under the status page's strict Content-Security-Policy, from one row of the
run table (``runlist.run_detail``); a run still going reloads itself until it ends.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from zoneinfo import ZoneInfo

from kontod.ops.status_page import BASE_STYLE, REFRESH_S, local
from kontod.ops.suspicion import Suspicion
from kontod.scheduler.contract import RunStatus
from kontod.scheduler.runlist import RunDetail

SECONDS = "%Y-%m-%d %H:%M:%S %Z"
STYLE = """
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;margin:1rem 0;
background:#fff;padding:.8rem 1rem;border:1px solid #e3e6ec;border-radius:6px;max-width:40rem}
dt{color:#5b6474}dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;background:#fff}
td{padding:.25rem .8rem .25rem 0;border-bottom:1px solid #e3e6ec}td.n{text-align:right}
h2{font-size:1.05rem;margin:1.2rem 0 .3rem}
pre.error{max-width:none}
@media (max-width:30rem){dl{grid-template-columns:1fr;gap:0}dd{margin-bottom:.4rem}}
"""


def render(run: RunDetail, suspicion: Suspicion | None, tz: ZoneInfo, now: datetime) -> str:
    """The page of ``run``; ``suspicion`` is the verdict on it when it is a suspicious success."""
    job = escape(run.job)
    status = escape(run.status)
    running = run.status == RunStatus.RUNNING
    duration = f"{run.duration_s(now):.1f} s" + (" so far" if running else "")
    facts = [
        ("job", f'<a href="/#job-{job}">{job}</a>'),
        ("status", f'<span class="s-{status}">{status}</span>'),
        ("trigger", escape(run.trigger)),
        ("attempt", str(run.attempt)),
        ("tick", escape(local(run.scheduled_for, tz, SECONDS))),
        ("started", escape(local(run.started_at, tz, SECONDS))),
        ("finished", escape(local(run.finished_at, tz, SECONDS))),
        ("duration", duration),
        ("instance", escape(run.instance)),
        ("requested by", escape(run.requested_by or "-")),
        ("reason", escape(run.reason or "-")),
        ("last heartbeat", escape(local(run.heartbeat_at, tz, SECONDS))),
    ]
    if running:
        facts.append(("lease until", escape(local(run.lease_until, tz, SECONDS))))
    rows = "\n".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    counts = "\n".join(
        f'<tr><td>{escape(key)}</td><td class="n">{value}</td></tr>'
        for key, value in sorted(run.counts.items())
    )
    sections = []
    if run.error:
        sections.append(f'<h2>error</h2>\n<pre class="error">{escape(run.error)}</pre>')
    if suspicion is not None and suspicion.suspicious:
        sections.append(
            f'<h2>suspicious</h2>\n<p class="warn">{escape(suspicion.reason or "")}</p>'
        )
    sections.append(
        f'<h2>counts</h2>\n<table class="counts">{counts}</table>'
        if counts
        else '<h2>counts</h2>\n<p class="muted">none</p>'
    )
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">\n' if running else ""
    body = "\n".join(sections)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}<title>run {run.id} of {job} · kontod</title>
<link rel="icon" href="data:,">
<style>{BASE_STYLE}{STYLE}</style>
</head>
<body>
<nav><a href="/#job-{job}">status page</a><a href="/jobs/{job}/runs">runs of {job} (JSON)</a></nav>
<h1>run {run.id} of {job} <span class="s-{status}">{status}</span></h1>
<dl class="run">
{rows}
</dl>
{body}
</body>
</html>
"""
