"""Prometheus metrics on a registry of kontod's own.

Run and error counts, last success and the state of each job come from the run table (through
the runner's cache of it), so they are right after a restart and the same on every replica.
Durations, items, skipped ticks and provider requests are counted by this process.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kontod import __version__
from kontod.board import Board
from kontod.health import Verdict, assess_job
from kontod.job import JobSpec
from kontod.jobs.refresh import NEEDS_USER, STALE_COUNT, STALE_REASONS, STATE_COUNT
from kontod.runs import JobStats

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)
PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SKIP_REASONS = ("overlap", "claimed", "paused")


def new_registry() -> CollectorRegistry:
    """A registry of kontod's own, for ``Metrics`` and what is built before it."""
    # The *_created series add nothing kontod's rules or dashboard use.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated
    return CollectorRegistry(auto_describe=True)


class ProviderMetrics:
    """The bank provider's requests, by endpoint and status code: the provider client's observer.

    Built before the jobs (whose client reports to it), and so before ``Metrics``, on the same
    registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kontod_provider_requests",
            "HTTP requests to the bank provider, by endpoint and status code",
            ["endpoint", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "kontod_provider_request_duration_seconds",
            "Duration of HTTP requests to the bank provider",
            ["endpoint"],
            buckets=PROVIDER_BUCKETS,
            registry=registry,
        )

    def request(self, endpoint: str, code: str, seconds: float) -> None:
        self.requests.labels(endpoint, code).inc()
        self.duration.labels(endpoint).observe(seconds)


class Metrics:
    """Every kontod metric; also the runner's event sink and the pinger's observer.

    Everything it reads is given to its constructor: the per-job history (``stats``), the board
    (verdicts with pauses, and its own families), when a failed tick is retried
    (``next_retry``) and the newest snapshot date (``latest_snapshot``).
    """

    def __init__(
        self,
        jobs: list[JobSpec],
        tz: ZoneInfo,
        stats: Callable[[], Mapping[str, JobStats]],
        clock: Callable[[], datetime],
        *,
        registry: CollectorRegistry | None = None,
        provider: ProviderMetrics | None = None,
        board: Board | None = None,
        next_retry: Callable[[str, JobStats, datetime], datetime | None] | None = None,
        latest_snapshot: Callable[[], date | None] = lambda: None,
    ) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.latest_snapshot = latest_snapshot
        self.duration = Histogram(
            "kontod_job_duration_seconds",
            "Run duration of each job",
            ["job_name"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.items = Counter(
            "kontod_job_items",
            "Items processed by jobs, by outcome",
            ["job_name", "outcome"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "kontod_job_ticks_skipped",
            "Scheduled ticks this process did not run, by reason",
            ["job_name", "reason"],
            registry=self.registry,
        )
        self.provider = provider if provider is not None else ProviderMetrics(self.registry)
        self.pings = Counter(
            "kontod_pings",
            "Pings sent to the outside dead man's switch, by kind and outcome (after retries)",
            ["job_name", "kind", "outcome"],
            registry=self.registry,
        )
        # When the newest tick of a job is tried again (the runner's retry policy).
        self.next_retry: Callable[[str, JobStats, datetime], datetime | None] = (
            next_retry if next_retry is not None else lambda job, st, now: None
        )
        # The health verdict of a job: the board's (it knows the pauses) when there is one.
        self.verdict: Callable[[JobSpec, JobStats, datetime], Verdict] = (
            board.verdict
            if board is not None
            else lambda spec, st, now: assess_job(spec, tz, st, now)
        )
        for spec in jobs:
            self.duration.labels(spec.name)
            for reason in SKIP_REASONS:
                self.skipped.labels(spec.name, reason)
        self.registry.register(_JobCollector(jobs, tz, stats, clock, self))
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(_Forward(collector))
        if board is not None:
            # Pauses, suspicious success and progress, beside the run history.
            self.registry.register(_BoardCollector(board, stats, clock))

    # RunEvents
    def run_finished(
        self, job: str, status: str, duration_s: float, counts: Mapping[str, int]
    ) -> None:
        self.duration.labels(job).observe(duration_s)
        for key, value in counts.items():
            if key.startswith("items_") and value > 0:
                self.items.labels(job, key.removeprefix("items_")).inc(value)

    def tick_skipped(self, job: str, reason: str) -> None:
        self.skipped.labels(job, reason).inc()

    def ping(self, job: str, kind: str, outcome: str) -> None:
        self.pings.labels(job, kind, outcome).inc()


def _refresh_families(all_stats: Mapping[str, JobStats]) -> Iterator[GaugeMetricFamily]:
    """Connections by state and stale accounts by reason, as of the last finished refresh.

    Read from the run's stored counts, so every replica exports the same values after a
    restart; the states that need the user and every reason are exported even at 0, so that
    rules comparing with an hour or a day ago always have both sides.
    """
    connections = GaugeMetricFamily(
        "kontod_provider_connections",
        "Active bank connections by Powens state (ok: synced fine) or kontod's error kind,"
        " as of the last refresh",
        labels=["state"],
    )
    stale = GaugeMetricFamily(
        "kontod_refresh_stale_accounts",
        "Bank accounts still stale after the last refresh, by reason",
        labels=["reason"],
    )
    last: Mapping[str, int] = {}
    for stats in all_stats.values():
        if any(key.startswith(STATE_COUNT) for key in stats.last_counts):
            last = stats.last_counts
    if last:
        by_state = dict.fromkeys(("ok", *sorted(NEEDS_USER)), 0)
        by_reason = dict.fromkeys(STALE_REASONS, 0)
        for key, value in last.items():
            if key.startswith(STATE_COUNT):
                by_state[key.removeprefix(STATE_COUNT)] = value
            elif key.startswith(STALE_COUNT):
                by_reason[key.removeprefix(STALE_COUNT)] = value
        for state, value in sorted(by_state.items()):
            connections.add_metric([state], value)
        for reason, value in sorted(by_reason.items()):
            stale.add_metric([reason], value)
    yield connections
    yield stale


class _Forward(Collector):
    """Serves one of prometheus_client's stock collectors from our registry."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        # The stock collectors are registered on the default registry already; collecting them
        # through a wrapper avoids registering one object on two registries.
        yield from self.inner.collect()


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class _JobCollector(Collector):
    def __init__(
        self,
        jobs: list[JobSpec],
        tz: ZoneInfo,
        stats: Callable[[], Mapping[str, JobStats]],
        clock: Callable[[], datetime],
        metrics: Metrics,
    ) -> None:
        self.jobs = jobs
        self.tz = tz
        self.stats = stats
        self.clock = clock
        self.metrics = metrics

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        now = self.clock()
        all_stats = self.stats()
        label = ["job_name"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=label)

        runs = CounterMetricFamily("kontod_job_runs", "Finished runs of each job", labels=label)
        errors = CounterMetricFamily(
            "kontod_job_errors", "Runs that ended in error, timeout or interruption", labels=label
        )
        last_success = gauge(
            "kontod_job_last_success_timestamp_seconds", "End of the last successful run"
        )
        last_finished = gauge(
            "kontod_job_last_run_finished_timestamp_seconds", "End of the last finished run"
        )
        last_ok = gauge("kontod_job_last_run_success", "Whether the last finished run succeeded")
        running = gauge("kontod_job_running", "Whether a run of the job is in progress")
        running_since = gauge(
            "kontod_job_running_since_timestamp_seconds", "Start of the run in progress"
        )
        last_tick = gauge(
            "kontod_job_last_scheduled_timestamp_seconds", "Most recent scheduled tick"
        )
        next_tick = gauge("kontod_job_next_scheduled_timestamp_seconds", "Next scheduled tick")
        grace = gauge("kontod_job_grace_seconds", "How late a run may start before it is missed")
        max_runtime = gauge("kontod_job_max_runtime_seconds", "Run time after which a run stops")
        registered = gauge(
            "kontod_job_registered_timestamp_seconds", "When kontod first knew the job"
        )
        configured = gauge("kontod_job_configured", "Whether the job has what it needs to run")
        healthy = gauge("kontod_job_healthy", "Whether the job is healthy, as in /health/cron")
        next_retry = gauge(
            "kontod_job_next_retry_timestamp_seconds",
            "When the failed newest tick is run again (absent when no retry is due)",
        )
        counts = GaugeMetricFamily(
            "kontod_job_last_run_counts",
            "Counts recorded by the last finished run",
            labels=["job_name", "count"],
        )
        for spec in self.jobs:
            st = all_stats.get(spec.name, JobStats())
            verdict = self.metrics.verdict(spec, st, now)
            name = [spec.name]
            runs.add_metric(name, st.runs)
            errors.add_metric(name, st.errors)
            for family, value in (
                (last_success, _ts(st.last_success_at)),
                (last_finished, _ts(st.last_finished_at)),
                (running_since, _ts(st.running_since)),
                (registered, _ts(st.registered_at)),
            ):
                if value is not None:
                    family.add_metric(name, value)
            if st.last_finished_status is not None:
                last_ok.add_metric(name, 1.0 if st.last_finished_status == "success" else 0.0)
            running.add_metric(name, 1.0 if st.running_since else 0.0)
            last_tick.add_metric(name, verdict.last_tick.timestamp())
            next_tick.add_metric(name, verdict.next_tick.timestamp())
            grace.add_metric(name, spec.grace.total_seconds())
            max_runtime.add_metric(name, spec.max_runtime.total_seconds())
            configured.add_metric(name, 0.0 if spec.not_configured else 1.0)
            healthy.add_metric(name, 1.0 if verdict.healthy else 0.0)
            retry_at = _ts(self.metrics.next_retry(spec.name, st, now))
            if retry_at is not None:
                next_retry.add_metric(name, retry_at)
            for key, value in sorted(st.last_counts.items()):
                if not key.startswith((STATE_COUNT, STALE_COUNT)):
                    counts.add_metric([spec.name, key], value)
        yield from (runs, errors, last_success, last_finished, last_ok, running, running_since)
        yield from (last_tick, next_tick, grace, max_runtime, registered, configured, healthy)
        yield next_retry
        yield counts
        yield from _refresh_families(all_stats)
        yield from _conversion_families(self.jobs, all_stats)

        info = GaugeMetricFamily(
            "kontod_build_info", "kontod version and Python", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        latest = GaugeMetricFamily(
            "kontod_snapshot_latest_date_timestamp_seconds",
            "Midnight, in kontod's zone, of the newest date in patrimoine_snapshots",
        )
        newest = self.metrics.latest_snapshot()
        if newest is not None:
            midnight = datetime.combine(newest, time(), self.tz)
            latest.add_metric([], midnight.timestamp())
        yield latest


def _conversion_families(
    jobs: list[JobSpec], all_stats: Mapping[str, JobStats]
) -> Iterator[GaugeMetricFamily]:
    """Unconverted accounts and rate ages by currency, from the last run's counts
    (``unconverted_<CUR>``, ``rate_age_days_<CUR>``), so every replica exports the same."""
    unconverted = GaugeMetricFamily(
        "kontod_snapshot_unconverted_accounts",
        "Accounts the last snapshot left out of the totals for want of a usable rate",
        labels=["job_name", "currency"],
    )
    age = GaugeMetricFamily(
        "kontod_snapshot_rate_age_seconds",
        "Age, at the last snapshot's date, of the newest stored rate of each currency in use",
        labels=["job_name", "currency"],
    )
    for spec in jobs:
        counts = all_stats.get(spec.name, JobStats()).last_counts
        for key, value in sorted(counts.items()):
            if key.startswith("unconverted_"):
                unconverted.add_metric([spec.name, key.removeprefix("unconverted_")], value)
            elif key.startswith("rate_age_days_"):
                age.add_metric([spec.name, key.removeprefix("rate_age_days_")], value * 86400.0)
    yield unconverted
    yield age


class _BoardCollector(Collector):
    """What operators set and see beside the run history: pauses, suspicion, progress."""

    def __init__(
        self,
        board: Board,
        stats: Callable[[], Mapping[str, JobStats]],
        clock: Callable[[], datetime],
    ) -> None:
        self.board = board
        self.stats = stats
        self.clock = clock

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        now = self.clock()
        label = ["job_name"]
        paused = GaugeMetricFamily("kontod_job_paused", "Whether the job is paused", labels=label)
        paused_since = GaugeMetricFamily(
            "kontod_job_paused_since_timestamp_seconds", "Start of the pause in force", labels=label
        )
        pause_ended = GaugeMetricFamily(
            "kontod_job_pause_ended_timestamp_seconds",
            "End of the job's last pause (ticks before it were not expected to run)",
            labels=label,
        )
        suspicious = GaugeMetricFamily(
            "kontod_job_last_run_suspicious",
            "Whether the last finished run succeeded with far less work or time than usual",
            labels=label,
        )
        done = GaugeMetricFamily(
            "kontod_job_progress_done", "Items done by the run in progress here", labels=label
        )
        expected = GaugeMetricFamily(
            "kontod_job_progress_expected", "Items expected by the run in progress", labels=label
        )
        ratio = GaugeMetricFamily(
            "kontod_job_progress_ratio", "Share of the run in progress done (0 to 1)", labels=label
        )
        for view in self.board.views(self.stats(), now):
            name = [view.spec.name]
            paused.add_metric(name, 0.0 if view.pause is None else 1.0)
            if view.pause is not None:
                paused_since.add_metric(name, view.pause.since.timestamp())
            ended = self.board.pauses.states.get(view.spec.name)
            if ended is not None and ended.last_ended_at is not None:
                pause_ended.add_metric(name, ended.last_ended_at.timestamp())
            suspicious.add_metric(name, 1.0 if view.suspicion.suspicious else 0.0)
            if view.progress is not None:
                done.add_metric(name, view.progress.done)
                if view.progress.expected is not None:
                    expected.add_metric(name, view.progress.expected)
                if view.progress.ratio is not None:
                    ratio.add_metric(name, view.progress.ratio)
        yield from (paused, paused_since, pause_ended, suspicious, done, expected, ratio)
