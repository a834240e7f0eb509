"""Prometheus metrics on a registry of kontod's own, in two kinds of parts.

Instruments are pushed to as things happen in this process: durations, items, skipped ticks
and pings (``RunInstruments``, the runner's event sink) and provider requests
(``ProviderInstruments``, the provider client's observer). Collectors read on each scrape:
run and error counts, last success and the state of each job from the run table (through the
history's cache of it, so they are right after a restart and the same on every replica), what
each job declares it exports (``JobExportsCollector``), and the board. Each part is built with
its constructor arguments and registers itself on the registry it is given.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from kontod.ops.board import Board
from kontod.ops.health import Verdict
from kontod.scheduler.contract import CountFamily, JobExports, JobSpec, RunStatus, SkipReason
from kontod.scheduler.runs import JobStats

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)
PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The reasons a scheduled tick is skipped (``stopping`` is not counted: the process is ending).
SKIP_REASONS = (SkipReason.OVERLAP, SkipReason.CLAIMED, SkipReason.PAUSED)

Stats = Callable[[], Mapping[str, JobStats]]
Clock = Callable[[], datetime]


def new_registry() -> CollectorRegistry:
    """An empty registry of kontod's own, with the process, platform and GC metrics."""
    # The *_created series add nothing kontod's rules or dashboard use.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_BuildInfo())
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(_Forward(collector))
    return registry


class RunInstruments:
    """What this process counts of its runs: the runner's event sink and the pinger's observer."""

    def __init__(self, registry: CollectorRegistry, jobs: Sequence[str]) -> None:
        self.duration = Histogram(
            "kontod_job_duration_seconds",
            "Run duration of each job",
            ["job_name"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.items = Counter(
            "kontod_job_items",
            "Items processed by jobs, by outcome",
            ["job_name", "outcome"],
            registry=registry,
        )
        self.skipped = Counter(
            "kontod_job_ticks_skipped",
            "Scheduled ticks this process did not run, by reason",
            ["job_name", "reason"],
            registry=registry,
        )
        self.pings = Counter(
            "kontod_pings",
            "Pings sent to the outside dead man's switch, by kind and outcome (after retries)",
            ["job_name", "kind", "outcome"],
            registry=registry,
        )
        for name in jobs:
            self.duration.labels(name)
            for reason in SKIP_REASONS:
                self.skipped.labels(name, reason)

    # RunEvents
    def run_finished(
        self, job: str, status: str, duration_s: float, counts: Mapping[str, int]
    ) -> None:
        """A run of ``job`` ended here: its duration and items by outcome."""
        self.duration.labels(job).observe(duration_s)
        for key, value in counts.items():
            if key.startswith("items_") and value > 0:
                self.items.labels(job, key.removeprefix("items_")).inc(value)

    def tick_skipped(self, job: str, reason: str) -> None:
        """A scheduled tick of ``job`` started no run here, for ``reason``."""
        self.skipped.labels(job, reason).inc()

    def ping(self, job: str, kind: str, outcome: str) -> None:
        """A ping of ``job`` was sent (or given up)."""
        self.pings.labels(job, kind, outcome).inc()


class ProviderInstruments:
    """HTTP requests to the bank provider: the provider client's observer."""

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

    def provider_request(self, endpoint: str, code: str, seconds: float) -> None:
        """One request (one attempt) to ``endpoint`` answered ``code`` in ``seconds``."""
        self.requests.labels(endpoint, code).inc()
        self.duration.labels(endpoint).observe(seconds)


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


class RunTableCollector(Collector):
    """Each job's runs, errors, last outcome, ticks, limits and health, read on scrape from
    the run table's cached stats; ``verdict`` and ``next_retry`` are the board's and the
    runner's."""

    def __init__(
        self,
        registry: CollectorRegistry,
        jobs: Sequence[JobSpec],
        stats: Stats,
        clock: Clock,
        verdict: Callable[[JobSpec, JobStats, datetime], Verdict],
        next_retry: Callable[[str, JobStats, datetime], datetime | None],
    ) -> None:
        self.jobs = list(jobs)
        self.stats = stats
        self.clock = clock
        self.verdict = verdict
        self.next_retry = next_retry
        registry.register(self)

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
            verdict = self.verdict(spec, st, now)
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
                last_ok.add_metric(
                    name, 1.0 if st.last_finished_status == RunStatus.SUCCESS else 0.0
                )
            running.add_metric(name, 1.0 if st.running_since else 0.0)
            last_tick.add_metric(name, verdict.last_tick.timestamp())
            next_tick.add_metric(name, verdict.next_tick.timestamp())
            grace.add_metric(name, spec.grace.total_seconds())
            max_runtime.add_metric(name, spec.max_runtime.total_seconds())
            configured.add_metric(name, 0.0 if spec.not_configured else 1.0)
            healthy.add_metric(name, 1.0 if verdict.healthy else 0.0)
            retry_at = _ts(self.next_retry(spec.name, st, now))
            if retry_at is not None:
                next_retry.add_metric(name, retry_at)
            # A family the job exports on its own only is left out of the plain counts.
            own = tuple(f.prefix for f in spec.exports.families if not f.in_run_counts)
            for key, value in sorted(st.last_counts.items()):
                if not (own and key.startswith(own)):
                    counts.add_metric([spec.name, key], value)
        yield from (runs, errors, last_success, last_finished, last_ok, running, running_since)
        yield from (last_tick, next_tick, grace, max_runtime, registered, configured, healthy)
        yield next_retry
        yield counts


class JobExportsCollector(Collector):
    """What each job declares it exports (``JobExports``), read on scrape: its count families
    from its last finished run's counts, and its freshness from the history's last probe.

    ``exports`` maps each job's name to its declarations; ``freshness`` gives each probe's
    last reading by metric name.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        exports: Mapping[str, JobExports],
        tz: ZoneInfo,
        stats: Stats,
        freshness: Callable[[], Mapping[str, date | datetime | None]],
    ) -> None:
        self.exports = dict(exports)
        self.tz = tz
        self.stats = stats
        self.freshness = freshness
        registry.register(self)

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        all_stats = self.stats()
        # One metric family per name, whichever jobs declare it, in declaration order.
        families: dict[str, tuple[CountFamily, GaugeMetricFamily]] = {}
        owners: dict[str, list[str]] = {}
        for job, exports in self.exports.items():
            for fam in exports.families:
                if fam.metric not in families:
                    labels = ["job_name", fam.label] if fam.per_job else [fam.label]
                    families[fam.metric] = (
                        fam,
                        GaugeMetricFamily(fam.metric, fam.doc, labels=labels),
                    )
                owners.setdefault(fam.metric, []).append(job)
        for metric, (fam, family) in families.items():
            if fam.per_job:
                for job in owners[metric]:
                    values = fam.values(all_stats.get(job, JobStats()).last_counts) or {}
                    for value, n in sorted(values.items()):
                        family.add_metric([job, value], n * fam.scale)
            else:
                # One job owns the metric: the last declaring job that exported it wins.
                found: dict[str, int] | None = None
                for job in owners[metric]:
                    found = fam.values(all_stats.get(job, JobStats()).last_counts) or found
                for value, n in sorted((found or {}).items()):
                    family.add_metric([value], n * fam.scale)
            yield family
        readings = self.freshness()
        for exports in self.exports.values():
            for probe in exports.freshness:
                gauge = GaugeMetricFamily(probe.metric, probe.doc)
                at = readings.get(probe.metric)
                if isinstance(at, datetime):
                    gauge.add_metric([], at.timestamp())
                elif at is not None:
                    gauge.add_metric([], datetime.combine(at, time(), self.tz).timestamp())
                yield gauge


class _BuildInfo(Collector):
    def collect(self) -> Iterator[object]:  # type: ignore[override]
        info = GaugeMetricFamily(
            "kontod_build_info", "kontod version and Python", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


class BoardCollector(Collector):
    """What operators set and see beside the run history: pauses, suspicion, progress."""

    def __init__(
        self, registry: CollectorRegistry, board: Board, stats: Stats, clock: Clock
    ) -> None:
        self.board = board
        self.stats = stats
        self.clock = clock
        registry.register(self)

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
