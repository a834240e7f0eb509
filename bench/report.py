"""The results as a compact text table and as JSON, both from the same numbers."""

from __future__ import annotations

from typing import Any

from bench.refresh import RefreshPass, RefreshResult
from bench.snapshots import Memory, SnapshotResult


def _n(value: int) -> str:
    return f"{value:,}".replace(",", " ")


def _rate(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}".replace(",", " ")


def _kb(value: int) -> str:
    return f"{value / 1024:,.0f} KiB".replace(",", " ")


def growth_per_user(points: list[Memory], old: bool) -> float | None:
    """Bytes of peak heap each extra user adds, between the smallest and largest traced sizes."""
    if len(points) < 2:
        return None
    first, last = points[0], points[-1]
    if last.users == first.users:
        return None
    if old:
        grown = last.old_peak_bytes - first.old_peak_bytes
    else:
        grown = last.kontod_peak_bytes - first.kontod_peak_bytes
    return grown / (last.users - first.users)


def table(environment: dict[str, Any], snap: SnapshotResult, fresh: RefreshResult) -> str:
    """A compact, fixed-width report of both benchmarks."""
    c = snap.comparison
    old_label = "old, per user, a round trip per row" + (
        "" if snap.old_commit == "statement" else " (1 tx/user)"
    )
    lines = [
        f"kontod bench: {environment['cpus']} CPUs, Python {environment['python']},"
        f" PostgreSQL {environment['postgresql']}; {environment['profile']} run,"
        f" {environment['wall_seconds']:g} s in all",
        "",
        f"daily-snapshots: {_n(snap.users)} users ({_n(snap.accounts)} accounts,"
        f" {_n(snap.assets)} assets), each implementation on a date of its own",
        f"  {'':48} {'time':>9} {'users/s':>9}",
        f"  {f'kontod, set-based, batches of {snap.batch_size}':48}"
        f" {snap.kontod.seconds:8.2f}s {_rate(snap.kontod.users_per_second):>9}",
        f"  {old_label:48} {snap.old.seconds:8.2f}s {_rate(snap.old.users_per_second):>9}",
        f"  {'speed-up (old time / kontod time)':48} {snap.speedup:8.1f}x",
        f"  rows written: {_n(c.rows_kontod)} by kontod, {_n(c.rows_old)} by the old way;"
        f" {_n(c.differing)} differing; sum of totals {c.total_kontod} vs {c.total_old}:"
        f" {'identical' if c.same else 'DIFFERENT'}",
    ]
    if snap.memory:
        sizes = [f"{_n(m.users)} users" for m in snap.memory]
        lines.append(
            f"  {'peak Python heap (tracemalloc)':48}"
            + "".join(f" {s:>13}" for s in sizes)
            + f" {'per extra user':>15}"
        )
        for label, old in (("kontod", False), ("old", True)):
            peaks = [m.old_peak_bytes if old else m.kontod_peak_bytes for m in snap.memory]
            slope = growth_per_user(snap.memory, old)
            shown = "" if slope is None else f"{_n(round(slope))} B"
            lines.append(
                f"  {'  ' + label:48}" + "".join(f" {_kb(p):>13}" for p in peaks) + f" {shown:>15}"
            )
    lines += [
        "",
        f"refresh-stale-connections: {_n(fresh.users)} users,"
        f" {fresh.requests_per_user} bank requests each,"
        f" {fresh.latency_s * 1000:g} ms per request (sandbox bank)",
        f"  {'':48} {'time':>9} {'users/s':>9} {'max in flight':>14} {'requests':>9}",
    ]
    for p in (fresh.bounded, fresh.serial):
        label = f"kontod, concurrency {p.concurrency}" + (
            " (the old way)" if p.concurrency == 1 else ""
        )
        lines.append(
            f"  {label:48} {p.seconds:8.2f}s {_rate(p.users_per_second, 1):>9}"
            f" {p.max_in_flight:14} {p.requests:9}"
        )
    both = fresh.bounded.complete and fresh.serial.complete
    lines += [
        f"  {'speed-up (serial time / bounded time)':48} {fresh.speedup:8.1f}x"
        f"  (at most {fresh.ceiling:.1f}x: {fresh.users} users, {fresh.bounded.concurrency} at once)",
        f"  every user refreshed, every account updated and transaction imported in both:"
        f" {'yes' if both else 'NO'}",
    ]
    return "\n".join(lines)


def _pass(p: RefreshPass) -> dict[str, Any]:
    return {
        "concurrency": p.concurrency,
        "seconds": round(p.seconds, 3),
        "users_per_second": round(p.users_per_second, 2),
        "max_in_flight": p.max_in_flight,
        "requests": p.requests,
        "refreshed": p.refreshed,
        "failed": p.failed,
        "accounts_updated": p.accounts_updated,
        "transactions_inserted": p.transactions_inserted,
        "complete": p.complete,
    }


def as_json(
    environment: dict[str, Any], snap: SnapshotResult, fresh: RefreshResult
) -> dict[str, Any]:
    """The numbers of the table, as one JSON-ready mapping."""
    c = snap.comparison
    return {
        "environment": environment,
        "snapshots": {
            "users": snap.users,
            "accounts": snap.accounts,
            "assets": snap.assets,
            "batch_size": snap.batch_size,
            "old_commit": snap.old_commit,
            "kontod": {
                "seconds": round(snap.kontod.seconds, 3),
                "users_per_second": round(snap.kontod.users_per_second, 1),
                "rows": snap.kontod.rows,
            },
            "old": {
                "seconds": round(snap.old.seconds, 3),
                "users_per_second": round(snap.old.users_per_second, 1),
                "rows": snap.old.rows,
            },
            "speedup": round(snap.speedup, 2),
            "same_rows": c.same,
            "differing_rows": c.differing,
            "sum_of_totals": {"kontod": str(c.total_kontod), "old": str(c.total_old)},
            "sum_of_all_rows": {"kontod": str(c.all_kontod), "old": str(c.all_old)},
            "peak_heap_bytes": [
                {"users": m.users, "kontod": m.kontod_peak_bytes, "old": m.old_peak_bytes}
                for m in snap.memory
            ],
            "peak_heap_growth_bytes_per_user": {
                "kontod": growth_per_user(snap.memory, old=False),
                "old": growth_per_user(snap.memory, old=True),
            },
        },
        "refresh": {
            "users": fresh.users,
            "latency_ms": fresh.latency_s * 1000,
            "requests_per_user": fresh.requests_per_user,
            "bounded": _pass(fresh.bounded),
            "serial": _pass(fresh.serial),
            "speedup": round(fresh.speedup, 2),
            "speedup_ceiling": round(fresh.ceiling, 2),
        },
    }
