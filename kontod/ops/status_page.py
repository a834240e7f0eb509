"""The status page at ``/``: server-rendered HTML, inline SVG, no script and no outside asset.

A pure function of the board's view of the jobs (what ``/health/cron`` reads) and ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from zoneinfo import ZoneInfo

from kontod.ops.board import BARS, JobView
from kontod.scheduler.contract import RunStatus
from kontod.scheduler.runlist import Run

# What the page may load: its own inline style and data: URLs, nothing else.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
COLOURS: dict[str, str] = {
    RunStatus.SUCCESS: "#2e7d32",
    RunStatus.ERROR: "#c62828",
    RunStatus.TIMEOUT: "#ad1457",
    RunStatus.INTERRUPTED: "#ef6c00",
    RunStatus.RUNNING: "#1565c0",
}
BAR_W, BAR_GAP, CHART_H = 7, 2, 44

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:84rem;padding:0 2rem;
color:#1d2330;background:#fafbfc}
h1{font-size:1.4rem;margin:0 0 .2rem}h1 small{font-weight:normal;color:#5b6474;font-size:.9rem}
nav a{margin-right:1rem}
table{border-collapse:collapse;width:100%;margin-top:1rem;background:#fff}
th,td{text-align:left;padding:.55rem .7rem;border-bottom:1px solid #e3e6ec;vertical-align:top}
th{font-size:.8rem;text-transform:uppercase;letter-spacing:.04em;color:#5b6474}
.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}
.paused{color:#8a5a00;font-weight:600}.warn{color:#8a5a00}
.muted{color:#5b6474;font-size:.85rem}
.nowrap{white-space:nowrap}td.status{min-width:9rem;max-width:18rem}
progress{width:9rem;vertical-align:middle}
.legend span{display:inline-block;margin-right:.9rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
"""


def render(views: Sequence[JobView], tz: ZoneInfo, now: datetime) -> str:
    """The whole page."""
    healthy = all(v.verdict.healthy for v in views)
    overall = '<span class="ok">healthy</span>' if healthy else '<span class="bad">unhealthy</span>'
    rows = "\n".join(_row(v, tz, now) for v in views)
    legend = "".join(
        f'<span><i style="background:{colour}"></i>{status}</span>'
        for status, colour in COLOURS.items()
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kontod status</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body>
<h1>kontod {overall} <small>at {escape(_local(now, tz))}</small></h1>
<nav><a href="/health/cron">/health/cron</a><a href="/metrics">/metrics</a></nav>
<table>
<thead><tr><th>job</th><th>status</th><th>last success</th><th>next run</th>
<th>paused</th><th>progress</th><th>last {BARS} runs (height: duration)</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="legend muted">{legend}</p>
</body>
</html>
"""


def _row(v: JobView, tz: ZoneInfo, now: datetime) -> str:
    name = escape(v.spec.name)
    if not v.verdict.healthy:
        status = f'<span class="bad">unhealthy</span><br><span class="muted">{escape(v.verdict.reason or "")}</span>'
    elif v.spec.not_configured:
        status = f'<span class="muted">not configured: {escape(v.spec.not_configured)}</span>'
    else:
        status = f'<span class="ok">healthy</span><br><span class="muted">last run: {escape(v.stats.last_status or "never run")}</span>'
    if v.suspicion.suspicious:
        status += f'<br><span class="warn">suspicious: {escape(v.suspicion.reason or "")}</span>'
    if v.pause is None:
        paused = '<span class="muted">no</span>'
    else:
        until = f"<br>until {escape(_local(v.pause.until, tz))}" if v.pause.until else ""
        paused = (
            f'<span class="paused">paused</span> by {escape(v.pause.by)}{until}'
            f'<br><span class="muted">{escape(v.pause.reason)}</span>'
        )
    next_run = "-" if v.spec.not_configured else escape(_local(v.verdict.next_tick, tz))
    return (
        f'<tr id="job-{name}"><td class="nowrap"><strong>{name}</strong><br>'
        f'<a class="muted" href="/jobs/{name}/runs">runs</a></td>'
        f'<td class="status">{status}</td>'
        f'<td class="nowrap">{escape(_local(v.stats.last_success_at, tz))}</td>'
        f'<td class="nowrap">{next_run}</td><td>{paused}</td><td>{_progress(v, tz)}</td>'
        f"<td>{_bars(v.spec.name, v.runs, now)}</td></tr>"
    )


def _progress(v: JobView, tz: ZoneInfo) -> str:
    p = v.progress
    if p is None:
        return '<span class="muted">-</span>'
    if p.expected is None or p.ratio is None:
        return f"{p.done} done"
    eta = f"<br>ends about {escape(_local(p.eta, tz))}" if p.eta else ""
    return (
        f'<progress max="{p.expected}" value="{p.done}">{p.ratio:.0%}</progress> '
        f'{p.done}/{p.expected}<span class="muted">{eta}</span>'
    )


def _bars(job: str, runs: Sequence[Run], now: datetime) -> str:
    """Oldest on the left; each bar's height is its duration against the longest shown."""
    shown = list(reversed(runs[:BARS]))
    width = BARS * (BAR_W + BAR_GAP)
    if not shown:
        return '<span class="muted">no run yet</span>'
    longest = max(r.duration_s(now) for r in shown) or 1.0
    bars = []
    for i, r in enumerate(shown):
        duration = r.duration_s(now)
        height = max(2.0, CHART_H * duration / longest)
        who = f" · requested by {r.requested_by}" if r.requested_by else ""
        why = f" · {r.reason}" if r.reason else ""
        tip = (
            f"run {r.id} · {r.status} · {duration:.1f} s · {r.trigger} · "
            f"{r.started_at.isoformat(timespec='seconds')}{who}{why}"
        )
        bars.append(
            f'<rect class="bar" data-status="{r.status}" x="{i * (BAR_W + BAR_GAP)}" '
            f'y="{CHART_H - height:.1f}" width="{BAR_W}" height="{height:.1f}" '
            f'fill="{COLOURS.get(r.status, "#777")}"><title>{escape(tip)}</title></rect>'
        )
    return (
        f'<svg role="img" aria-label="last runs of {escape(job)}" width="{width}" '
        f'height="{CHART_H}" viewBox="0 0 {width} {CHART_H}">{"".join(bars)}</svg>'
    )


def _local(value: datetime | None, tz: ZoneInfo) -> str:
    if value is None:
        return "-"
    try:
        return value.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
    except (OverflowError, ValueError):
        # Near year 1 or 9999 the zone's offset leaves Python's range: show the instant as
        # stored, clamped, rather than fail the page.
        edge = datetime.max if value.year > 5000 else datetime.min
        return edge.strftime("%Y-%m-%d %H:%M") + " UTC"
