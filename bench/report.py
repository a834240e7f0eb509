"""The results: whether the run measured anything (``failures``), the targets and whether they
are met, a markdown report, and the JSON of a run."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.lite import LiteResult
from bench.refresh import RefreshPass, RefreshResult
from bench.scale import ScaleResult
from bench.service import ServiceResult, summary

TARGET_SIZES = (100_000, 1_000_000)
TARGET_CONCURRENCIES = (8, 32, 64)
# kontod against the floor run with its own parallelism: batches and a day that may already
# hold rows may cost at most this much more.
PARALLEL_FLOOR_BOUND = 1.1


@dataclass(frozen=True)
class Target:
    """One target of the benchmark, with what this run measured for it."""

    measure: str
    target: str
    measured: str
    # None: not measured at the size the target is about (see ``note``).
    met: bool | None
    note: str = ""
    # Reported for information only: kept from an earlier definition of the target.
    informative: bool = False


@dataclass
class Results:
    environment: dict[str, Any]
    snapshots: list[ScaleResult]
    refresh: RefreshResult | None
    service: ServiceResult | None
    run_table: dict[str, Any]
    # Sizes asked for but not measured, with why.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # The snapshot on a Konto SQLite file (bench/lite.py).
    lite: list[LiteResult] = field(default_factory=list)


def _n(value: float) -> str:
    return f"{value:,.0f}".replace(",", " ")


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def _size(snapshots: list[ScaleResult], users: int) -> ScaleResult | None:
    return next((s for s in snapshots if s.users == users), None)


def failures(r: Results, requested: Sequence[int], lite_requested: Sequence[int] = ()) -> list[str]:
    """Why this run measured less than it claims, one sentence each; empty when it did not.

    A size asked for and not measured, sides that wrote different rows, a re-run of an unchanged
    day that wrote or removed a row, a refresh that left users stale: each fails the run. A
    slow figure never does.
    """
    found: list[str] = []
    measured = {s.users for s in r.snapshots}
    for users in dict.fromkeys(requested):
        if users in measured:
            continue
        why = next((k["reason"] for k in r.skipped if k["users"] == users), "no result")
        found.append(f"{users} users were asked for and not measured: {why}")
    for s in r.snapshots:
        if not s.same_rows:
            found.append(f"{s.users} users: kontod's rows differ from the floor's")
        if not s.parallel_comparisons or not all(c.same for c in s.parallel_comparisons):
            found.append(f"{s.users} users: the parallel floor's rows differ from the floor's")
        if not all(c.same for c in s.old_comparisons):
            found.append(f"{s.users} users: the old job's rows differ from the floor's")
        reruns = [p for p in s.passes if p.variant == "rerun"]
        if not reruns:
            found.append(f"{s.users} users: no re-run of an unchanged day was measured")
        for p in reruns:
            if p.rows or p.changed_in_tables is None or p.changed_in_tables:
                found.append(
                    f"{s.users} users: the re-run of unchanged {p.day.isoformat()} wrote or"
                    f" removed rows ({p.rows} by its counts, "
                    + ("not checked" if p.changed_in_tables is None else f"{p.changed_in_tables}")
                    + " in the tables); it must write none"
                )
    found += _lite_failures(r.lite, lite_requested)
    if r.refresh is not None:
        for x in [*r.refresh.passes, r.refresh.serial]:
            if x is not None and not x.complete:
                found.append(
                    f"refresh at concurrency {x.concurrency} left users unrefreshed"
                    f" ({x.users} users)"
                )
    return found


def _lite_failures(results: list[LiteResult], requested: Sequence[int]) -> list[str]:
    """The SQLite Konto's part of ``failures``: sizes missing, rows unequal, re-runs that wrote."""
    found = []
    measured = {s.users for s in results}
    for users in dict.fromkeys(requested):
        if users not in measured:
            found.append(f"SQLite Konto: {users} users were asked for and not measured")
    for s in results:
        if s.kontod_differs != 0:
            found.append(
                f"SQLite Konto, {s.users} users: {s.kontod_differs} of kontod's rows differ from"
                " the floor's by more than half a cent"
            )
        if s.libsql_differs not in (None, 0):
            found.append(
                f"SQLite Konto, {s.users} users: {s.libsql_differs} of kontod's rows through the"
                " libSQL server differ from the floor's by more than half a cent"
            )
        if s.old_differs not in (None, 0):
            found.append(
                f"SQLite Konto, {s.users} users: {s.old_differs} of the web app's loop's rows"
                " differ from the floor's"
            )
        if s.rerun_rows or not s.seconds("rerun"):
            found.append(
                f"SQLite Konto, {s.users} users: the re-run of an unchanged day wrote or removed"
                f" {s.rerun_rows} rows, or was not measured; it must write none"
            )
    return found


# The size the SQLite Konto's targets are about.
LITE_TARGET_SIZE = 100_000


def lite_targets(results: list[LiteResult]) -> list[Target]:
    """The SQLite Konto's targets, at 100 000 users."""
    s = next((x for x in results if x.users == LITE_TARGET_SIZE), None)
    note = "" if s is not None else "size not measured in this run"
    at = f"{_n(LITE_TARGET_SIZE)} users"

    def ratio(label: str, top: str, bottom: str, bound: float, op: str) -> Target:
        value = s.ratio(top, bottom) if s else None
        met = None if value is None else (value <= bound if op == "≤" else value >= bound)
        return Target(f"SQLite {label}, {at}", f"{op} {bound:g}", _x(value), met, note)

    def wait(key: str, bound: float) -> Target:
        value = s.writer_wait(key) if s else None
        return Target(
            f"SQLite: a concurrent writer's wait, {key}, {at}",
            f"< {bound * 1000:g} ms",
            "-" if value is None else f"{value * 1000:.0f} ms",
            None if value is None else value < bound,
            note,
        )

    peak = s.peak_rss_kib if s else None
    return [
        ratio("kontod/floor", "kontod", "floor", 1.0, "≤"),
        ratio("old/kontod (the web app's loop)", "old", "kontod", 20.0, "≥"),
        wait("p99", 0.25),
        wait("max", 1.0),
        ratio("re-run unchanged / aggregate", "rerun", "aggregate", 1.5, "≤"),
        Target(
            f"SQLite: kontod peak RSS, {at}",
            "< 150 MiB",
            _mib(peak),
            None if peak is None else peak < 150 * 1024,
            note,
        ),
    ]


def targets(r: Results) -> list[Target]:
    """Every target of the issue, evaluated where this run measured it."""
    found: list[Target] = []
    if not r.snapshots and r.lite:  # a run of the SQLite Konto alone (--lite-only)
        return lite_targets(r.lite)
    for users in TARGET_SIZES:
        s = _size(r.snapshots, users)
        found.append(
            _ratio_target(
                s,
                users,
                "snapshot kontod/parallel floor",
                "kontod",
                "parallel",
                PARALLEL_FLOOR_BOUND,
                "≤",
                r.skipped,
            )
        )
        found.append(
            dataclasses.replace(
                _ratio_target(
                    s, users, "snapshot kontod/floor", "kontod", "floor", 1.0, "≤", r.skipped
                ),
                informative=True,
            )
        )
        found.append(
            _ratio_target(
                s, users, "re-run unchanged / aggregate", "rerun", "aggregate", 1.5, "≤", r.skipped
            )
        )
    s = _size(r.snapshots, 100_000)
    found.append(
        _ratio_target(s, 100_000, "snapshot old/kontod", "old", "kontod", 20.0, "≥", r.skipped)
    )
    largest = max(r.snapshots, key=lambda x: x.users) if r.snapshots else None
    peak = largest.peak_rss_kib if largest else None
    found.append(
        Target(
            "kontod peak RSS during the 1 000 000-user snapshot",
            "< 150 MiB",
            f"{_mib(peak)} at {_n(largest.users)} users" if largest else "-",
            None
            if largest is None or largest.users < 1_000_000 or peak is None
            else peak < 150 * 1024,
            "" if largest and largest.users >= 1_000_000 else "largest size measured is smaller",
        )
    )
    passes = {p.concurrency: p for p in r.refresh.passes} if r.refresh else {}
    for c in TARGET_CONCURRENCIES:
        p = passes.get(c)
        found.append(
            Target(
                f"refresh share of ideal, c = {c}",
                "≥ 80 %",
                "-" if p is None else f"{p.share_of_ideal:.0%} ({_n(p.users)} users)",
                None if p is None or p.users < 2000 else p.share_of_ideal >= 0.8,
                "" if p is None or p.users >= 2000 else f"{p.users} users, not 2 000",
            )
        )
    svc = r.service
    for endpoint in ("/metrics", "/health/cron"):
        lat = svc.during_run.get(endpoint) if svc else None
        found.append(
            Target(
                f"{endpoint} p99 during the 1 000 000-user run",
                "< 50 ms",
                "-"
                if lat is None or svc is None
                else f"{_ms(lat.p99)} ms at {_n(svc.users)} users",
                None
                if lat is None or lat.p99 is None or svc is None or svc.users < 1_000_000
                else lat.p99 < 0.05,
                "" if svc is not None and svc.users >= 1_000_000 else "measured on a smaller size",
            )
        )
    rt = r.run_table
    found.append(
        Target(
            "/health/cron p99 with 10⁶ rows in the run table",
            "< 50 ms",
            "-" if rt.get("p99_ms") is None else f"{rt['p99_ms']:.1f} ms",
            None
            if rt.get("p99_ms") is None or rt.get("rows", 0) < 1_000_000
            else rt["p99_ms"] < 50,
            rt.get("note", ""),
        )
    )
    if svc is not None:
        found += [
            Target("idle RSS", "< 80 MiB", _mib(svc.idle_rss_kib), svc.idle_rss_kib < 80 * 1024),
            Target(
                "start to /health 200 (external database)",
                "< 1.5 s",
                _s(svc.start_to_ready_s),
                svc.start_to_ready_s < 1.5,
            ),
            Target(
                "idle CPU",
                "< 0.5 CPU-s per minute",
                f"{svc.idle_cpu_per_minute:.2f} CPU-s/min over {svc.idle_cpu_window_s:g} s",
                svc.idle_cpu_per_minute < 0.5,
            ),
        ]
    return found + lite_targets(r.lite)


def _ratio_target(
    s: ScaleResult | None,
    users: int,
    label: str,
    top: str,
    bottom: str,
    bound: float,
    op: str,
    skipped: list[dict[str, Any]],
) -> Target:
    ratio = s.ratio(top, bottom) if s else None
    met = None if ratio is None else (ratio <= bound if op == "≤" else ratio >= bound)
    note = ""
    if s is None:
        note = "size not measured in this run"
        why = next((k["reason"] for k in skipped if k["users"] == users), None)
        if why:
            note = why
    elif ratio is None:
        note = s.old_note or f"{top} not measured"
    return Target(f"{label}, {_n(users)} users", f"{op} {bound:g}", _x(ratio), met, note)


def markdown(r: Results) -> str:
    """The report: environment, snapshots, refresh, daemon, targets."""
    env = r.environment
    out = [
        f"{env['cpus']} CPUs ({env['cpu_model']}), {env['memory_gib']} GiB, Python {env['python']},"
        f" PostgreSQL {env['postgresql']} ({env['server']});"
        f" load {env['load_before']} before, {env['load_after']} after; {env['profile']} run,"
        f" {env['wall_seconds']:.0f} s in all, {env['finished_at']}.",
        "",
    ]
    if r.snapshots:
        out += [
            "**daily-snapshots** (median of the passes, min-max in brackets; each pass on a date"
            " of its own; the tables already hold the history):",
            "",
            "| users | accounts | rows a day | rows in the tables | kontod | re-run | floor"
            " | parallel floor | aggregate | old | kontod/floor | kontod/parallel floor"
            " | re-run/aggregate | old/kontod | rows equal | kontod peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in r.snapshots:
            rows_day = next((p.rows for p in s.passes if p.variant == "floor"), 0)
            equal = (
                "yes"
                if s.same_rows
                and s.parallel_comparisons
                and all(c.same for c in s.parallel_comparisons)
                else "NO"
            )
            out.append(
                f"| {_n(s.users)} | {_n(s.sizes.accounts)} | {_n(rows_day)}"
                f" | {_n(s.sizes.snapshot_rows + s.sizes.holding_rows)} ({s.history_days} days)"
                f" | {_spread(s.seconds('kontod'))} | {_spread(s.seconds('rerun'))}"
                f" | {_spread(s.seconds('floor'))} | {_spread(s.seconds('parallel'))}"
                f" | {_spread(s.seconds('aggregate'))} | {_spread(s.seconds('old'))}"
                f" | {_x(s.ratio('kontod', 'floor'))} | {_x(s.ratio('kontod', 'parallel'))}"
                f" | {_x(s.ratio('rerun', 'aggregate'))}"
                f" | {_x(s.ratio('old', 'kontod'))} | {equal} | {_mib(s.peak_rss_kib)} |"
            )
        notes = [f"{_n(s.users)} users: {s.old_note}" for s in r.snapshots if s.old_note]
        workers = sorted({(s.batch_size, s.workers) for s in r.snapshots})
        out += [
            "",
            "kontod ran with "
            + "; ".join(f"batches of {_n(b)} users, {w} workers" for b, w in workers)
            + "; the parallel floor with as many connections as workers, one range of user ids"
            " each, all at once. Rows equal: kontod's and the parallel floor's rows are the"
            " floor's.",
        ]
        for s in r.snapshots:
            if s.in_place:
                out += [
                    "",
                    f"{_n(s.users)} users: measured on the template itself ({s.repetitions}"
                    f" repetitions; {s.in_place}); the rows the passes wrote were removed"
                    " afterwards.",
                ]
        for k in r.skipped:
            out += ["", f"{_n(k['users'])} users: not measured, {k['reason']}."]
        rewritten = [f"{_n(s.users)} users: {_n(s.rerun_rows_written)} rows" for s in r.snapshots]
        old_equal = [
            f"{_n(s.users)} users: " + ("yes" if all(c.same for c in s.old_comparisons) else "NO")
            for s in r.snapshots
            if s.old_comparisons
        ]
        if old_equal:
            out += [
                "",
                "The old job writes the same rows as the floor (holdings, categories, total,"
                " converted): " + "; ".join(old_equal) + ".",
            ]
        out += [
            "",
            "Rows written by the re-runs of an unchanged day: " + "; ".join(rewritten) + ".",
        ]
        if notes:
            out += ["", "Old job: " + "; ".join(notes) + "."]
        out.append("")
    if r.refresh is not None:
        f = r.refresh
        out += [
            f"**refresh-stale-connections**, {f.latency_s * 1000:g} ms per request (sandbox bank"
            f" in its own process; capacity with no latency: {_n(f.capacity.requests_per_second)}"
            f" requests/s at {f.capacity.cpu_seconds / max(f.capacity.requests, 1) * 1000:.2f}"
            " CPU-ms each):",
            "",
            "| concurrency | users | requests | time | ideal | share of ideal | in flight"
            " | sandbox req/s | sandbox CPU | kontod CPU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in [*f.passes, *([f.serial] if f.serial else [])]:
            out.append(_refresh_row(p, f.serial is p))
        out.append("")
    if r.service is not None:
        v = r.service
        out += [
            f"**daemon** (`kontod run`, external database, {v.rate_per_endpoint:g} requests/s per"
            " endpoint, latency in ms from the time each request was due):",
            "",
            "| | /metrics p50 | p99 | max | /health/cron p50 | p99 | max |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, lat in (
            ("idle", v.idle),
            (f"during daily-snapshots, {_n(v.users)} users ({v.run_seconds:.1f} s)", v.during_run),
        ):
            m, h = lat["/metrics"], lat["/health/cron"]
            out.append(
                f"| {label} | {_ms(m.p50)} | {_ms(m.p99)} | {_ms(m.max)}"
                f" | {_ms(h.p50)} | {_ms(h.p99)} | {_ms(h.max)} |"
            )
        out += [
            "",
            f"Start to ready {_s(v.start_to_ready_s)}; RSS idle {_mib(v.idle_rss_kib)}, after the"
            f" run {_mib(v.after_run_rss_kib)}, peak {_mib(v.peak_rss_kib)}; idle CPU"
            f" {v.idle_cpu_per_minute:.3f} CPU-s per minute.",
            "",
        ]
    if r.lite:
        out += _lite_markdown(r.lite)
    out += ["**Targets**:", "", "| measure | target | measured | met |", "|---|---|---|---|"]
    for t in targets(r):
        met = {True: "yes", False: "**no**", None: "not measured"}[t.met]
        if t.informative:
            met = {True: "yes", False: "no", None: "not measured"}[t.met] + ", information only"
        note = f" ({t.note})" if t.note else ""
        out.append(f"| {t.measure} | {t.target} | {t.measured} | {met}{note} |")
    return "\n".join(out)


def _lite_markdown(results: list[LiteResult]) -> list[str]:
    out = [
        "**daily-snapshots on a Konto SQLite file** (the web app's own tables, rollback"
        " journal; median of the passes, min-max in brackets; a writer commits one small"
        " transaction every 50 ms beside each kontod run):",
        "",
        "| users | accounts | rows a day | kontod | re-run | kontod via libSQL | floor | aggregate"
        " | web app's loop"
        " | kontod/floor | re-run/aggregate | loop/kontod | writer wait p99 / max"
        " | kontod's write transactions p99 / max | writer wait max during the floor"
        " | rows equal | kontod peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results:
        rows_day = next((p.rows for p in s.passes if p.variant == "floor"), 0)
        waits = f"{_ms(s.writer_wait('p99'))} / {_ms(s.writer_wait('max'))} ms"
        locks = f"{_ms(s.lock_held('p99'))} / {_ms(s.lock_held('max'))} ms"
        equal = (
            "yes"
            if s.kontod_differs == 0 and s.libsql_differs in (None, 0) and not s.old_differs
            else "NO"
        )
        out.append(
            f"| {_n(s.users)} | {_n(s.accounts)} | {_n(rows_day)}"
            f" | {_spread(s.seconds('kontod'))} | {_spread(s.seconds('rerun'))}"
            f" | {_spread(s.seconds('libsql'))}"
            f" | {_spread(s.seconds('floor'))} | {_spread(s.seconds('aggregate'))}"
            f" | {_spread(s.seconds('old'))} | {_x(s.ratio('kontod', 'floor'))}"
            f" | {_x(s.ratio('rerun', 'aggregate'))} | {_x(s.ratio('old', 'kontod'))}"
            f" | {waits} | {locks} | {_ms(s.writer_wait('max', 'floor'))} ms"
            f" | {equal} | {_mib(s.peak_rss_kib)} |"
        )
    notes = [f"{_n(s.users)} users: {p.note}" for s in results for p in s.passes if p.note]
    out += [
        "",
        "kontod in batches of "
        + ", ".join(sorted({_n(s.batch_size) for s in results}))
        + " users, one at a time, in exact decimals, on the file itself; kontod via libSQL: the"
        " same run through the Hrana sandbox serving the file (Hrana 3 over HTTP on loopback, the"
        " sandbox in a process of its own), on a date of its own; the floor (one transaction: every holding"
        " row by one `INSERT … SELECT`, then every category and total row from them) and the"
        " web app's loop in floats, so rows are compared to the cent. Web app's loop: "
        + "; ".join(notes)
        + ".",
        "",
    ]
    return out


def _refresh_row(p: RefreshPass, serial: bool) -> str:
    label = f"{p.concurrency}" + (" (the old way)" if serial else "")
    return (
        f"| {label} | {_n(p.users)} | {_n(p.requests)} | {_s(p.seconds)} | {_s(p.ideal_seconds)}"
        f" | {p.share_of_ideal:.0%} | {p.max_in_flight} | {_n(p.requests / p.seconds)}"
        f" | {p.sandbox_busy:.0%} of a core | {p.job_busy:.0%} of a core |"
    )


def as_json(r: Results, failed: Sequence[str] = ()) -> dict[str, Any]:
    """Every figure of the run, the targets and whether they were met, and ``failed``: why the
    run failed (``failures``), empty when it did not."""
    return {
        "environment": r.environment,
        "failures": list(failed),
        "snapshots": [_scale_json(s) for s in r.snapshots],
        "refresh": None if r.refresh is None else _refresh_json(r.refresh),
        "service": None if r.service is None else _service_json(r.service),
        "run_table": r.run_table,
        "skipped_sizes": r.skipped,
        "lite": [asdict(s) for s in r.lite],
        "targets": [asdict(t) for t in targets(r)],
    }


def _scale_json(s: ScaleResult) -> dict[str, Any]:
    variants = {}
    for v in ("kontod", "rerun", "floor", "parallel", "aggregate", "old"):
        values = s.seconds(v)
        if values:
            variants[v] = {
                "median_s": round(statistics.median(values), 4),
                "min_s": round(min(values), 4),
                "max_s": round(max(values), 4),
                "passes": len(values),
            }
    return {
        "users": s.users,
        "sizes": asdict(s.sizes),
        "history_days": s.history_days,
        "generated_seconds": None if s.generated_seconds is None else round(s.generated_seconds, 1),
        "repetitions": s.repetitions,
        "batch_size": s.batch_size,
        "workers": s.workers,
        "in_place": s.in_place,
        "variants": variants,
        "ratios": {
            "kontod_over_floor": s.ratio("kontod", "floor"),
            "kontod_over_parallel_floor": s.ratio("kontod", "parallel"),
            "rerun_over_aggregate": s.ratio("rerun", "aggregate"),
            "old_over_kontod": s.ratio("old", "kontod"),
        },
        "rows_equal": s.same_rows,
        "comparisons": [
            {
                **asdict(c),
                "kontod_day": c.kontod_day.isoformat(),
                "floor_day": c.floor_day.isoformat(),
            }
            for c in s.comparisons
        ],
        "parallel_rows_equal": bool(s.parallel_comparisons)
        and all(c.same for c in s.parallel_comparisons),
        "parallel_comparisons": [
            {
                **{k: v for k, v in asdict(c).items() if k != "kontod_day"},
                "parallel_day": c.kontod_day.isoformat(),
                "floor_day": c.floor_day.isoformat(),
            }
            for c in s.parallel_comparisons
        ],
        "old_rows_equal": all(c.same for c in s.old_comparisons) if s.old_comparisons else None,
        "old_comparisons": [
            {
                **asdict(c),
                "old_day": c.kontod_day.isoformat(),
                "floor_day": c.floor_day.isoformat(),
            }
            for c in s.old_comparisons
        ],
        "rerun_rows_written": s.rerun_rows_written,
        "kontod_peak_rss_kib": s.peak_rss_kib,
        "old_note": s.old_note,
        "passes": [
            {**asdict(p), "day": p.day.isoformat(), "seconds": round(p.seconds, 4)}
            for p in s.passes
        ],
    }


def _refresh_json(f: RefreshResult) -> dict[str, Any]:
    def one(p: RefreshPass) -> dict[str, Any]:
        return {
            **asdict(p),
            "ideal_seconds": round(p.ideal_seconds, 3),
            "share_of_ideal": round(p.share_of_ideal, 4),
            "sandbox_busy": round(p.sandbox_busy, 4),
            "job_busy": round(p.job_busy, 4),
            "complete": p.complete,
        }

    return {
        "users": f.users,
        "latency_ms": f.latency_s * 1000,
        "capacity": {
            **asdict(f.capacity),
            "requests_per_second": round(f.capacity.requests_per_second, 1),
        },
        "passes": [one(p) for p in f.passes],
        "serial": None if f.serial is None else one(f.serial),
    }


def _service_json(v: ServiceResult) -> dict[str, Any]:
    return {
        "users": v.users,
        "rate_per_endpoint": v.rate_per_endpoint,
        "start_to_ready_s": round(v.start_to_ready_s, 3),
        "idle_rss_kib": v.idle_rss_kib,
        "idle_cpu_window_s": v.idle_cpu_window_s,
        "idle_cpu_seconds": v.idle_cpu_seconds,
        "idle_cpu_seconds_per_minute": round(v.idle_cpu_per_minute, 4),
        "idle": summary(v.idle),
        "during_run": summary(v.during_run),
        "run_seconds": round(v.run_seconds, 2),
        "run_status": v.run_status,
        "after_run_rss_kib": v.after_run_rss_kib,
        "peak_rss_kib": v.peak_rss_kib,
    }
