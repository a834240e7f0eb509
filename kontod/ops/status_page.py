"""The status page at ``/``: server-rendered HTML, inline SVG, no script and no outside asset.

A pure function of the board's view of the jobs (what ``/health/cron`` reads) and ``now``.
Each bar links to its run's page (``/runs/{id}``, see ``run_page``), so a run's details are a
tap away on a phone, which has no hover; under ``NARROW`` the table becomes one card per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from zoneinfo import ZoneInfo

from kontod.ops.board import BARS, JobView
from kontod.scheduler.contract import FAILED_STATUSES, RunStatus
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
# A failed run is drawn at least this high, however short it was: a fast failure must not be
# the smallest bar on the page.
FAILED_MIN_H = CHART_H / 2
REFRESH_S = 15
NARROW = "48rem"  # below this width the table becomes cards
ERROR_SHOWN = 300  # characters of an error on the status page; its run page has all of it

# Shared with the run pages.
BASE_STYLE = f"""
body{{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:84rem;padding:0 2rem;
color:#1d2330;background:#fafbfc}}
h1{{font-size:1.4rem;margin:0 0 .2rem}}h1 small{{font-weight:normal;color:#5b6474;font-size:.9rem}}
nav a{{margin-right:1rem}}
.ok{{color:#2e7d32;font-weight:600}}.bad{{color:#c62828;font-weight:600}}
.paused{{color:#8a5a00;font-weight:600}}.warn{{color:#8a5a00}}
.muted{{color:#5b6474;font-size:.85rem}}
pre.error{{white-space:pre-wrap;overflow-wrap:anywhere;margin:.3rem 0;padding:.4rem .5rem;
background:#fdecea;border-left:3px solid #c62828;font-size:.8rem;max-width:40rem}}
{"".join(f".s-{status}{{color:{colour};font-weight:600}}" for status, colour in COLOURS.items())}
@media (max-width:{NARROW}){{body{{margin:1rem auto;padding:0 .75rem}}}}
"""

STYLE = f"""
table{{border-collapse:collapse;width:100%;margin-top:1rem;background:#fff}}
th,td{{text-align:left;padding:.55rem .7rem;border-bottom:1px solid #e3e6ec;vertical-align:top}}
th{{font-size:.8rem;text-transform:uppercase;letter-spacing:.04em;color:#5b6474}}
.nowrap{{white-space:nowrap}}td.status{{min-width:9rem;max-width:22rem}}
progress{{width:9rem;vertical-align:middle}}
svg.runs a rect.hit{{fill:transparent}}svg.runs a:hover rect.hit{{fill:#e3e6ec}}
.legend span{{display:inline-block;margin-right:.9rem}}
.legend i{{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}}
@media (max-width:{NARROW}){{
table,tbody,tr,td{{display:block}}thead{{display:none}}table{{background:none}}
tr{{background:#fff;border:1px solid #e3e6ec;border-radius:6px;margin-bottom:.8rem;padding:.3rem .7rem}}
td{{border:none;padding:.3rem 0;overflow-wrap:anywhere}}td.status{{max-width:none}}
td.nowrap{{white-space:normal}}
td[data-label]::before{{content:attr(data-label);display:block;font-size:.7rem;
text-transform:uppercase;letter-spacing:.04em;color:#5b6474}}
svg.runs{{width:100%;max-width:30rem;height:auto}}
}}
"""


def render(views: Sequence[JobView], tz: ZoneInfo, now: datetime) -> str:
    """The whole page."""
    healthy = all(v.verdict.healthy for v in views)
    overall = '<span class="ok">healthy</span>' if healthy else '<span class="bad">unhealthy</span>'
    paused = sum(1 for v in views if v.pause is not None)
    if paused:
        overall += f' <span class="paused">{paused} paused</span>'
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
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>kontod status</title>
<link rel="icon" href="data:,">
<style>{BASE_STYLE}{STYLE}</style>
</head>
<body>
<h1>kontod {overall} <small>at {escape(local(now, tz))}</small></h1>
<nav><a href="/health/cron">/health/cron</a><a href="/metrics">/metrics</a></nav>
<table>
<thead><tr><th>job</th><th>status</th><th>last success</th><th>next run</th>
<th>paused</th><th>progress</th><th>last {BARS} runs</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="legend muted">{legend}<br>Bar height: duration, against the longest shown; a failed
run at least half the height. Each bar opens its run. The page reloads every {REFRESH_S} s.</p>
</body>
</html>
"""


def _row(v: JobView, tz: ZoneInfo, now: datetime) -> str:
    name = escape(v.spec.name)
    if v.pause is None:
        paused = '<span class="muted">no</span>'
    else:
        until = f"<br>until {escape(local(v.pause.until, tz))}" if v.pause.until else ""
        paused = (
            f'<span class="paused">paused</span> by {escape(v.pause.by)}{until}'
            f'<br><span class="muted">{escape(v.pause.reason)}</span>'
        )
    next_run = "-" if v.spec.not_configured else escape(local(v.verdict.next_tick, tz))
    links = f'<a class="muted" href="/jobs/{name}/runs">runs (JSON)</a>'
    if v.runs:
        links = f'<a class="muted" href="/runs/{v.runs[0].id}">last run</a> · {links}'
    return (
        f'<tr id="job-{name}"><td class="nowrap"><strong>{name}</strong><br>{links}</td>'
        f'<td class="status" data-label="status">{_status(v)}</td>'
        f'<td class="nowrap" data-label="last success">'
        f"{escape(local(v.stats.last_success_at, tz))}</td>"
        f'<td class="nowrap" data-label="next run">{next_run}</td>'
        f'<td data-label="paused">{paused}</td>'
        f'<td data-label="progress">{_progress(v, tz)}</td>'
        f'<td data-label="last {BARS} runs">{_bars(v.spec.name, v.runs, now)}</td></tr>'
    )


def _status(v: JobView) -> str:
    """Health and why; a paused job says so with its last outcome; the error of a failed last
    run and the reason of a suspicious one, each with a link to that run."""
    outcome = v.stats.last_status or "never run"
    last = f'last run: <span class="s-{escape(outcome)}">{escape(outcome)}</span>'
    if v.spec.not_configured:
        text = f'<span class="muted">not configured: {escape(v.spec.not_configured)}</span>'
    elif v.pause is not None:
        text = f'<span class="paused">paused</span><br><span class="muted">{last}</span>'
    elif not v.verdict.healthy:
        text = (
            f'<span class="bad">unhealthy</span>'
            f'<br><span class="muted">{escape(v.verdict.reason or "")}</span>'
        )
    else:
        text = f'<span class="ok">healthy</span><br><span class="muted">{last}</span>'
    # The newest finished run: what the verdict on the last run is about.
    done = next((r for r in v.runs if r.finished_at is not None), None)
    if done is not None and done.status in FAILED_STATUSES and done.error:
        error = done.error if len(done.error) <= ERROR_SHOWN else done.error[:ERROR_SHOWN] + "…"
        text += (
            f'<pre class="error">{escape(error)}</pre>'
            f'<a class="muted" href="/runs/{done.id}">run {done.id}: {escape(done.status)}</a>'
        )
    if v.suspicion.suspicious:
        text += f'<br><span class="warn">suspicious: {escape(v.suspicion.reason or "")}</span>'
        if v.suspicion.run_id is not None:
            text += (
                f' <a class="muted" href="/runs/{v.suspicion.run_id}">run {v.suspicion.run_id}</a>'
            )
    return text


def _progress(v: JobView, tz: ZoneInfo) -> str:
    p = v.progress
    if p is None:
        return '<span class="muted">-</span>'
    if p.expected is None or p.ratio is None:
        return f"{p.done} done"
    eta = f"<br>ends about {escape(local(p.eta, tz))}" if p.eta else ""
    return (
        f'<progress max="{p.expected}" value="{p.done}">{p.ratio:.0%}</progress> '
        f'{p.done}/{p.expected}<span class="muted">{eta}</span>'
    )


def bar_height(run: Run, longest_s: float, now: datetime) -> float:
    """A bar's height: its duration against the longest shown, never under ``FAILED_MIN_H``
    for a failed run nor under 2 px for any."""
    height = CHART_H * run.duration_s(now) / (longest_s or 1.0)
    floor = FAILED_MIN_H if run.status in FAILED_STATUSES else 2.0
    return min(CHART_H, max(floor, height))


def _bars(job: str, runs: Sequence[Run], now: datetime) -> str:
    """Oldest on the left; each bar a link to its run's page, the whole column its target."""
    shown = list(reversed(runs[:BARS]))
    width = BARS * (BAR_W + BAR_GAP)
    if not shown:
        return '<span class="muted">no run yet</span>'
    longest = max(r.duration_s(now) for r in shown)
    bars = []
    for i, r in enumerate(shown):
        duration = r.duration_s(now)
        height = bar_height(r, longest, now)
        who = f" · requested by {r.requested_by}" if r.requested_by else ""
        why = f" · {r.reason}" if r.reason else ""
        tip = (
            f"run {r.id} · {r.status} · {duration:.1f} s · {r.trigger} · "
            f"{r.started_at.isoformat(timespec='seconds')}{who}{why}"
        )
        x = i * (BAR_W + BAR_GAP)
        bars.append(
            f'<a href="/runs/{r.id}"><title>{escape(tip)}</title>'
            f'<rect class="hit" x="{x}" y="0" width="{BAR_W + BAR_GAP}" height="{CHART_H}"/>'
            f'<rect class="bar" data-status="{escape(r.status)}" x="{x}" '
            f'y="{CHART_H - height:.1f}" width="{BAR_W}" height="{height:.1f}" '
            f'fill="{COLOURS.get(r.status, "#777")}"/></a>'
        )
    return (
        f'<svg class="runs" role="group" aria-label="last runs of {escape(job)}" width="{width}" '
        f'height="{CHART_H}" viewBox="0 0 {width} {CHART_H}">{"".join(bars)}</svg>'
    )


def local(value: datetime | None, tz: ZoneInfo, fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    """``value`` on kontod's clock, or ``-``; an instant out of Python's range is clamped."""
    if value is None:
        return "-"
    try:
        return value.astimezone(tz).strftime(fmt)
    except (OverflowError, ValueError):
        # Near year 1 or 9999 the zone's offset leaves Python's range: show the instant as
        # stored, clamped, rather than fail the page.
        edge = datetime.max if value.year > 5000 else datetime.min
        return edge.strftime("%Y-%m-%d %H:%M") + " UTC"
