"""The one place where kontod's jobs are declared: name, schedule, grace, limits, body."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import aiohttp
import asyncpg

from kontod.config import RateSettings, Settings
from kontod.jobs import audit, estimations, refresh, snapshots
from kontod.konto.store import KontoSql
from kontod.providers.dvf import DvfClient
from kontod.providers.powens import PowensClient
from kontod.providers.rates import crypto_map
from kontod.scheduler.contract import JobBody, JobSpec, RunContext

SNAPSHOTS = "daily-snapshots"
REFRESH = "refresh-stale-connections"
ESTIMATIONS = "refresh-property-estimations"
AUDIT = "prune-audit-log"
# Every job's name, known before anything is wired (the CLI checks a name against them).
NAMES = (SNAPSHOTS, REFRESH, ESTIMATIONS, AUDIT)


def schedules(settings: Settings) -> dict[str, str]:
    """Each job's schedule expression, by name, as the settings give it."""
    return {
        SNAPSHOTS: settings.snapshots.schedule,
        REFRESH: settings.refresh.schedule,
        ESTIMATIONS: settings.estimations.schedule,
        AUDIT: settings.audit.schedule,
    }


def declare_jobs(
    settings: Settings,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession | None = None,
    observe_request: Callable[[str, str, float], None] | None = None,
    konto: KontoSql | None = None,
) -> list[JobSpec]:
    """Every job, wired to the database and the settings. ``konto`` is Konto's SQLite-family
    database when Konto's tables are there (``kontod.konto.engines.open_checked``), None when
    they are in kontod's PostgreSQL beside its own."""
    refresh_body, refresh_not_configured = _refresh_wiring(
        settings, pool, http, observe_request, konto
    )
    return [
        JobSpec(
            name=SNAPSHOTS,
            schedule=schedules(settings)[SNAPSHOTS],
            body=snapshots.make_body(
                pool,
                settings.runner.tz,
                settings.snapshots.batch_size,
                _conversion(settings.rates),
                snapshots.SourceSettings(
                    fiat_url=settings.rates.fiat_url,
                    crypto_url=settings.rates.crypto_url,
                    timeout=settings.providers.timeout.total_seconds(),
                    attempts=settings.providers.attempts,
                    crypto_api_key=settings.rates.crypto_api_key,
                    max_body=settings.providers.max_body,
                ),
                http,
                workers=settings.snapshots.workers,
                konto=konto,
            ),
            grace=timedelta(hours=1),
            max_runtime=timedelta(hours=2),
            catchup_window=timedelta(hours=20),
            description="wealth snapshot of every user, once a day",
            exports=snapshots.exports(konto),
        ),
        JobSpec(
            name=REFRESH,
            schedule=schedules(settings)[REFRESH],
            body=refresh_body,
            grace=timedelta(minutes=30),
            max_runtime=timedelta(hours=5),
            catchup_window=timedelta(hours=5),
            description="refresh of stale bank connections through Powens",
            not_configured=refresh_not_configured,
            exports=refresh.EXPORTS,
        ),
        _estimations(settings, pool, http, observe_request, konto),
        _audit(settings, pool, konto),
    ]


def _conversion(rates: RateSettings) -> snapshots.Conversion:
    return snapshots.Conversion(
        base=rates.base_currency,
        max_age_days=rates.max_age_days,
        crypto_ids=crypto_map(rates.crypto_ids),
        manual=rates.manual,
    )


def _refresh_wiring(
    settings: Settings,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession | None,
    observe_request: Callable[[str, str, float], None] | None,
    konto: KontoSql | None,
) -> tuple[JobBody, str | None]:
    """The refresh body, or an idle one with the reason when no provider is configured."""
    bank, providers = settings.refresh, settings.providers
    if bank.powens_url is None:
        return _idle, "no provider configured (set KONTOD_POWENS_URL or KONTOD_POWENS_DOMAIN)"
    if http is None:
        raise ValueError("the refresh job needs an aiohttp.ClientSession when a provider is set")
    client = PowensClient(
        http,
        bank.powens_url,
        timeout=providers.timeout.total_seconds(),
        attempts=providers.attempts,
        observe=observe_request,
        rate=providers.rate,
        max_body=providers.max_body,
    )
    rotation = None
    if bank.powens_client_id is not None and bank.powens_client_secret is not None:
        rotation = refresh.Rotation(bank.powens_client_id, bank.powens_client_secret)
    body = refresh.make_body(
        pool,
        client,
        stale_after=bank.stale_after,
        concurrency=bank.concurrency,
        key=bank.db_encryption_key,
        token_hold=bank.rejection_hold,
        rotation=rotation,
        konto=konto,
    )
    return body, None


def _estimations(
    settings: Settings,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession | None,
    observe_request: Callable[[str, str, float], None] | None,
    konto: KontoSql | None,
) -> JobSpec:
    providers = settings.providers

    def connect(session: aiohttp.ClientSession) -> DvfClient:
        return DvfClient(
            session,
            settings.estimations.dvf_url,
            timeout=providers.timeout.total_seconds(),
            attempts=providers.attempts,
            observe=observe_request,
            rate=providers.rate,
            max_body=providers.max_body,
        )

    return JobSpec(
        name=ESTIMATIONS,
        schedule=schedules(settings)[ESTIMATIONS],
        body=estimations.make_body(pool, connect, http, settings.estimations.years, konto),
        grace=timedelta(hours=1),
        max_runtime=timedelta(hours=2),
        catchup_window=timedelta(hours=20),
        description="property estimates from the DVF sales of each asset's commune",
        exports=estimations.EXPORTS,
        requires=estimations.requirement(pool, konto),
    )


def _audit(settings: Settings, pool: asyncpg.Pool, konto: KontoSql | None) -> JobSpec:
    return JobSpec(
        name=AUDIT,
        schedule=schedules(settings)[AUDIT],
        body=audit.make_body(pool, settings.audit.days, settings.audit.batch_size, konto),
        grace=timedelta(hours=1),
        max_runtime=timedelta(hours=1),
        catchup_window=timedelta(hours=20),
        description=f"deletion of audit_log rows older than {settings.audit.days} days",
        exports=audit.EXPORTS,
        requires=audit.requirement(pool, konto),
    )


async def _idle(ctx: RunContext) -> None:
    """What an unconfigured job does if it is ever run by hand: nothing."""
