"""The whole alert path with the real programs: kontod -> Prometheus -> Alertmanager -> webhook.

kontod runs as its own process (``kontod run``) with schedules of a few seconds, against a real
PostgreSQL as a role of its own that is not a superuser, and against the sandbox bank.
Prometheus scrapes it every second with ``alerts.yml`` loaded (``for`` durations shortened);
Alertmanager posts to a webhook the test serves. The snapshot job is made to fail for real by
taking INSERT on ``patrimoine_snapshots`` away from kontod's role, then the privilege is given
back.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from kontod.demo import sandbox
from kontod.demo.dvf_sandbox import DEMO_COMMUNE, demo_sandbox
from kontod.demo.run import WEBAPP_EXTRAS_SQL
from tests import prom
from tests.integration.test_dashboard import check_queries
from tests.programs import kontod_script
from tests.sandbox_helpers import seed_user

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = "daily-snapshots"
# Long enough for Prometheus (1 s scrapes and evaluations) and Alertmanager (1 s group wait)
# with room for a slow machine.
ALERT_TIMEOUT_S = 90.0


def fast_rules(tmp: Path) -> Path:
    """alerts.yml with every ``for`` cut to 2 s (two scrapes and evaluations)."""
    text = (ROOT / "alerts.yml").read_text()
    alerts = len(re.findall(r"^\s*- alert:", text, re.MULTILINE))
    fast, changed = re.subn(r"^(\s+)for: \S+$", r"\1for: 2s", text, flags=re.MULTILINE)
    assert changed == alerts, f"{changed} `for` lines for {alerts} alerts"
    path = tmp / "alerts.yml"
    path.write_text(fast)
    return path


@asynccontextmanager
async def kontod_role(dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A login role with what kontod needs in the database of ``dsn``: (role, its DSN).

    It may use the tables of the migrated schema but create and own nothing, so a privilege
    taken away really is gone.
    """
    role = f"kontod_e2e_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
        await conn.execute(
            f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        )
        parts = urlsplit(dsn)
        host = parts.netloc.rpartition("@")[2]
        yield role, urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


@asynccontextmanager
async def running_kontod(
    tmp: Path, database_url: str, bank_url: str, dvf_url: str
) -> AsyncIterator[str]:
    """``kontod run`` in its own process; yields its host:port."""
    port = prom.free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
    }
    env.update(
        KONTOD_DATABASE_URL=database_url,
        KONTOD_LISTEN=f"127.0.0.1:{port}",
        KONTOD_STATE_DIR=str(tmp / "state"),
        KONTOD_TIMEZONE="UTC",
        KONTOD_SNAPSHOT_SCHEDULE="*/3 * * * * *",
        KONTOD_REFRESH_SCHEDULE="*/5 * * * * *",
        KONTOD_POWENS_URL=bank_url,
        KONTOD_ESTIMATION_SCHEDULE="*/4 * * * * *",
        KONTOD_DVF_URL=dvf_url,
        KONTOD_AUDIT_LOG_SCHEDULE="*/4 * * * * *",
        KONTOD_PROVIDER_TIMEOUT="5",
        KONTOD_SHUTDOWN_TIMEOUT="5",
        KONTOD_LOG_FORMAT="json",
        # KontodJobFailed waits for kontod's own retries of a failed tick; with none, a failed
        # run pages at once (the rule's wait is checked by its promtool test).
        KONTOD_RETRY_ATTEMPTS="0",
    )
    async with prom.running_program(
        [kontod_script(), "run"], tmp / "kontod.log", f"http://127.0.0.1:{port}/health", env
    ):
        yield f"127.0.0.1:{port}"


async def test_failed_snapshot_run_alerts_and_resolves(dsn: str, tmp_path: Path) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        # Two users with stale bank accounts: snapshots write rows, the refresh has work.
        await seed_user(pool, 1)
        await seed_user(pool, 2)
        # The web app's estimation columns and audit log, a flat to estimate, audit rows.
        await pool.execute(WEBAPP_EXTRAS_SQL)
        await pool.execute(
            """INSERT INTO assets (user_id, type, name, citycode, latitude, longitude, surface)
               VALUES (1, 'real_estate', 'Flat', $1, 45.7655, 4.8318, 62)""",
            DEMO_COMMUNE,
        )
        # One row old enough to go, one of now that stays: the audit log is never found empty
        # (which would be a suspicious success).
        await pool.execute(
            "INSERT INTO audit_log (timestamp, action, resource)"
            " VALUES ('2020-01-01 00:00:00', 'login', 'session')"
        )
        await pool.execute("INSERT INTO audit_log (action, resource) VALUES ('login', 'session')")
    finally:
        await pool.close()

    kontod_log = tmp_path / "kontod.log"
    async with (
        kontod_role(dsn) as (role, role_dsn),
        sandbox.serve() as bank_url,
        demo_sandbox().serve() as dvf_url,
        running_kontod(tmp_path, role_dsn, bank_url, dvf_url) as target,
        prom.webhook() as hook,
        prom.alertmanager(hook.url) as alertmanager_url,
        prom.prometheus(
            targets=[target], rule_files=[fast_rules(tmp_path)], alertmanager_url=alertmanager_url
        ) as prometheus,
    ):

        async def snapshot_ran() -> bool:
            ok = await prometheus.query(
                f'kontod_job_last_run_success{{job_name="{SNAPSHOTS}"}} == 1'
            )
            refreshed = await prometheus.query(
                'kontod_job_last_run_counts{count="stale_accounts_after"}'
            )
            return bool(ok and refreshed)

        try:
            await prom.wait_until(
                snapshot_ran, timeout=60, what="a successful snapshot and a refresh in Prometheus"
            )
        except TimeoutError as exc:
            targets = await prometheus.api("targets")
            raise AssertionError(
                f"{exc}\ntargets: {targets['activeTargets']}\nkontod log:\n{prom.tail(kontod_log)}"
            ) from None

        # Every dashboard panel has data once a few scrapes are in.
        failures: list[str] = []

        async def dashboard_has_data() -> bool:
            nonlocal failures
            failures = await check_queries(prometheus.url)
            return not failures

        try:
            await prom.wait_until(dashboard_has_data, timeout=60, what="data in every panel")
        except TimeoutError:
            raise AssertionError(
                "dashboard queries without data:\n" + "\n".join(failures)
            ) from None
        assert not hook.notifications, "a healthy kontod must not alert"

        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f"REVOKE INSERT ON patrimoine_snapshots FROM {role}")
            # New balances, so that a run must write (an unchanged day writes nothing).
            await admin.execute("UPDATE bank_accounts SET balance = balance + 1")
            try:
                firing = await hook.wait_for_alert(
                    "KontodJobFailed", "firing", {"job_name": SNAPSHOTS}, timeout=ALERT_TIMEOUT_S
                )
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\nkontod log:\n{prom.tail(kontod_log)}") from None
            assert firing["labels"]["severity"] == "warning"
            assert SNAPSHOTS in firing["annotations"]["summary"]
            assert firing["annotations"]["runbook_url"].endswith("#kontodjobfailed")
            fired_at = len(hook.notifications)
        finally:
            await admin.execute(f"GRANT INSERT ON patrimoine_snapshots TO {role}")
            await admin.close()

        await hook.wait_for_alert(
            "KontodJobFailed",
            "resolved",
            {"job_name": SNAPSHOTS},
            timeout=ALERT_TIMEOUT_S,
            after=fired_at,
        )

    seen = {
        (a["labels"]["alertname"], a["labels"].get("job_name"))
        for n in hook.notifications
        for a in n["alerts"]
    }
    assert seen == {("KontodJobFailed", SNAPSHOTS)}, f"unexpected alerts: {seen}"
