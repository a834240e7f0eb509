"""``kontod demo``: an embedded database with demo users, a sandbox bank, and the daemon.

``kontod demo --konto sqlite`` keeps the demo's Konto (users, accounts, snapshots) in a SQLite
file made with the web app's own table definitions, as the web app keeps it; ``--konto libsql``
serves that file as a libSQL server on loopback (the Hrana sandbox, with a token), as Turso
would. kontod's own tables stay in the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import asyncpg
import structlog

from kontod.config import KontoLocation, KontoSettings, Settings
from kontod.daemon import Daemon
from kontod.demo import lite, rates_sandbox, sandbox
from kontod.demo.hrana_sandbox import HranaSandbox
from kontod.konto import tokens
from kontod.konto.store import KontoSql
from kontod.scheduler.contract import SkipReason, Trigger
from kontod.scheduler.runner import Runner, Skipped

log = structlog.get_logger("kontod.demo")

# Three users: one with accounts and assets, one with a Powens connection, one owning nothing.
DEMO_SQL = """
INSERT INTO users (id, email, name) VALUES
    (1, 'alice@example.org', 'Alice'), (2, 'bruno@example.org', 'Bruno'),
    (3, 'chloe@example.org', 'Chloé');
INSERT INTO bank_accounts (user_id, provider, provider_account_id, name, balance, hidden, type)
VALUES
    (1, NULL, NULL, 'Compte courant', 2450.37, false, 'checking'),
    (1, NULL, NULL, 'Livret A', 12000.00, false, 'savings'),
    (1, NULL, NULL, 'Ancien compte', 999.99, true, 'checking'),
    (1, NULL, NULL, 'Prêt immo', -145000.00, false, 'loan'),
    (2, 'powens', '1001', 'Compte chèques', 0, false, NULL),
    (2, 'powens', '1002', 'LDDS', 0, false, NULL),
    (2, 'powens', '1003', 'PEA', 0, false, NULL);
INSERT INTO bank_accounts (user_id, provider, name, balance, type, subtype, currency) VALUES
    (1, 'blockchain', 'Ledger BTC', 0.35, 'investment', 'crypto', 'BTC'),
    (1, NULL, 'Chase checking (USD)', 1520.40, 'checking', NULL, 'USD');
INSERT INTO assets (user_id, type, name, purchase_price, current_value) VALUES
    (1, 'real_estate', 'Appartement', 210000.00, 248500.00),
    (1, 'vehicle', 'Voiture', 18000.00, NULL),
    (2, 'valuable', 'Montre', NULL, NULL);
SELECT setval(pg_get_serial_sequence('users', 'id'), 3);
"""


# The demo's token encryption key, used when no KONTOD_DB_ENCRYPTION_KEY is set: public, so
# that the demo database looks like the web app's (tokens stored encrypted).
DEMO_KEY = bytes.fromhex("6b6f6e746f642064656d6f206b6579" + "00" * 17)
# How many times (0.1 s apart) the demo asks again for a run of a job another run holds.
CLAIM_WAITS = 100
# The token of the demo's libSQL server (``--konto libsql``): public too, made up.
DEMO_LIBSQL_TOKEN = "kontod-demo-libsql-token"  # noqa: S105 (public, like DEMO_KEY)


async def seed(pool: asyncpg.Pool, key: bytes = DEMO_KEY) -> bool:
    """Insert the demo data into an empty database; False when users already exist."""
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)"):
            return False
        await conn.execute(DEMO_SQL)
        await conn.execute(
            """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
               VALUES (2, '2', $1, 'active')""",
            tokens.encrypt(sandbox.token_for(2), key),
        )
    return True


def demo_env(settings: Settings) -> str:
    """The settings another ``kontod`` command needs to open the demo's database and sandboxes.

    The demo keeps its embedded database apart from the default one (in
    ``KONTOD_STATE_DIR/demo``), so the other commands need to be told where it is.
    """
    parts = []
    if settings.database.url is None:
        parts.append(f"KONTOD_STATE_DIR={shlex.quote(str(settings.database.state_dir))}")
    location = settings.konto.location
    if location is not None:
        url = location.target if location.kind == "libsql" else "file:" + location.target
        parts.append(f"KONTOD_KONTO_URL={shlex.quote(url)}")
    if settings.konto.auth_token == DEMO_LIBSQL_TOKEN:
        # Like the demo's key: public, never a token of the user's own.
        parts.append(f"KONTOD_KONTO_AUTH_TOKEN={DEMO_LIBSQL_TOKEN}")
    if settings.refresh.powens_url is not None:
        parts.append(f"KONTOD_POWENS_URL={shlex.quote(settings.refresh.powens_url)}")
    parts.append(f"KONTOD_FIAT_RATES_URL={shlex.quote(settings.rates.fiat_url)}")
    parts.append(f"KONTOD_CRYPTO_PRICES_URL={shlex.quote(settings.rates.crypto_url)}")
    if settings.refresh.db_encryption_key == DEMO_KEY:
        # The demo's own key is public; a key of the user's own is a secret and never printed.
        parts.append(f"KONTOD_DB_ENCRYPTION_KEY={DEMO_KEY.hex()}")
    return " ".join(parts)


async def converted_summary(pool: asyncpg.Pool, base: str) -> str:
    """Alice's newest snapshot: her holdings in other currencies as converted, and her total."""
    rows = await pool.fetch(
        """SELECT h.name, h.amount, h.currency, h.value, t.total_value
             FROM holding_snapshots h
             JOIN patrimoine_snapshots t
               ON t.user_id = h.user_id AND t.date = h.date AND t.category = 'total'
            WHERE h.user_id = 1 AND h.currency IS DISTINCT FROM $1 AND h.kind = 'account'
              AND h.date = (SELECT max(date) FROM holding_snapshots WHERE user_id = 1)
            ORDER BY h.name""",
        base,
    )
    if not rows:
        return "\nno converted holding yet (see the daily-snapshots run's counts)"
    lines = [f"\nAlice's snapshot, in {base}:"]
    for r in rows:
        lines.append(f"  {r['name']}: {r['amount']} {r['currency']} = {r['value']:,.2f} {base}")
    lines.append(f"  total: {rows[0]['total_value']:,.2f} {base}")
    return "\n".join(lines)


async def lite_summary(konto: KontoSql, base: str) -> str:
    """``converted_summary`` on the demo's SQLite Konto, whose holding rows (the web app's)
    carry no amount or currency: those come from the accounts the rows name."""
    rows = await konto.read(
        """SELECT h.name, a.balance, a.currency, h.value, t.total_value
             FROM holding_snapshots h
             JOIN bank_accounts a ON a.id = h.ref_id
             JOIN patrimoine_snapshots t
               ON t.user_id = h.user_id AND t.date = h.date AND t.category = 'total'
            WHERE h.user_id = 1 AND h.kind = 'account' AND coalesce(a.currency, 'EUR') <> ?
              AND h.date = (SELECT max(date) FROM holding_snapshots WHERE user_id = 1)
            ORDER BY h.name""",
        (base,),
    )
    if not rows:
        return "\nno converted holding yet (see the daily-snapshots run's counts)"
    lines = [f"\nAlice's snapshot, in {base}:"]
    for name, amount, currency, value, _ in rows:
        held = f"{amount!s} {currency!s}"
        lines.append(f"  {name!s}: {held} = {float(value or 0):,.2f} {base}")
    lines.append(f"  total: {float(rows[0][4] or 0):,.2f} {base}")
    return "\n".join(lines)


def konto_lines(settings: Settings, path: Path | None) -> str:
    """Where the demo's Konto is (``path``: its SQLite file), and how to look at its snapshot
    rows."""
    location = settings.konto.location
    if location is None or path is None:
        return "Konto's tables: in the embedded PostgreSQL, beside kontod's own\n"
    query = (
        "SELECT date, user_id, category, total_value FROM patrimoine_snapshots"
        " ORDER BY date DESC, user_id, category"
    )
    served = ""
    if location.kind == "libsql":
        served = f", served as a libSQL server (Hrana over HTTP) at {location.target}"
    return (
        f"Konto's tables: the SQLite file {path}{served}\n"
        f"  sqlite3 -header -column {shlex.quote(str(path))} {shlex.quote(query)}\n"
    )


async def run_now(runner: Runner, name: str) -> asyncio.Task[str] | None:
    """The run of ``name`` this process has going, or one started now. At start a catch-up run
    may be claiming the job while the demo asks (the ask is then refused as an overlap, and
    the run is not known yet): the demo asks again until that run shows, so that it waits
    for every job before printing what they wrote."""
    for _ in range(CLAIM_WAITS):
        task = runner.active(name)
        if task is not None:
            return task
        outcome = await runner.trigger(
            name, Trigger.MANUAL, requested_by="demo", reason="kontod demo start"
        )
        if not isinstance(outcome, Skipped):
            return outcome.task
        if outcome.reason != SkipReason.OVERLAP:
            return None
        await asyncio.sleep(0.1)
    return None


async def demo(settings: Settings, konto: str = "postgresql") -> int:
    """Run the demo until Ctrl-C; ``konto`` is where the demo's Konto lives: ``postgresql``
    (beside kontod's tables), ``sqlite`` (a file in the demo's folder) or ``libsql`` (that
    file behind a libSQL server on loopback)."""

    key = settings.refresh.db_encryption_key or DEMO_KEY
    state_dir = settings.database.state_dir / "demo"
    # The demo's Konto is always its own: never a Konto the environment names.
    path = None
    if konto in ("sqlite", "libsql"):
        path = state_dir / "konto.db"
        state_dir.mkdir(parents=True, exist_ok=True)
        if lite.seed_konto(path, key):
            log.info("demo.seeded", users=3, konto=str(path))
    demo_settings = replace(
        settings,
        database=replace(
            settings.database,
            state_dir=state_dir,
            embedded=True,  # the demo's own database, created at its first start
        ),
        konto=KontoSettings(
            location=None if path is None else KontoLocation("sqlite", str(path)),
            busy_timeout=settings.konto.busy_timeout,
        ),
        refresh=replace(settings.refresh, db_encryption_key=key),
    )

    async def seed_once(pool: asyncpg.Pool) -> None:
        # With a SQLite Konto the copies of Konto's tables in PostgreSQL stay empty.
        if path is None and await seed(pool, key):
            log.info("demo.seeded", users=3)

    # The rate sources' sandbox serves yesterday's reference rates, as the ECB would at 02:00.
    rate_sources = rates_sandbox.RateSandbox(ecb_day=date.today() - timedelta(days=1))
    async with (
        sandbox.serve() as bank_url,
        rate_sources.serve() as rates_root,
        contextlib.AsyncExitStack() as servers,
    ):
        fiat_url, crypto_url = rates_sandbox.urls(rates_root)
        demo_settings = replace(
            demo_settings,
            refresh=replace(demo_settings.refresh, powens_url=bank_url),
            rates=replace(demo_settings.rates, fiat_url=fiat_url, crypto_url=crypto_url),
        )
        if konto == "libsql" and path is not None:
            server = HranaSandbox(path, DEMO_LIBSQL_TOKEN)
            url = await servers.enter_async_context(server.serve())
            demo_settings = replace(
                demo_settings,
                konto=KontoSettings(
                    location=KontoLocation("libsql", url),
                    auth_token=DEMO_LIBSQL_TOKEN,
                    busy_timeout=settings.konto.busy_timeout,
                ),
            )
        daemon = Daemon(demo_settings, on_migrated=seed_once)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await daemon.start()
        try:
            assert daemon.runner is not None
            # Show every job at work now rather than at its next tick.
            started = [await run_now(daemon.runner, name) for name in daemon.runner.jobs]
            await asyncio.gather(*(task for task in started if task is not None))
            assert daemon.pool is not None
            base_currency = settings.rates.base_currency
            summary = (
                await converted_summary(daemon.pool, base_currency)
                if daemon.konto is None
                else await lite_summary(daemon.konto, base_currency)
            )
            print(summary, file=sys.stderr)
            base = f"http://{demo_settings.http.host}:{daemon.port}"
            env = demo_env(demo_settings)
            print(
                "\nkontod demo is running; open:\n"
                f"  {base}/\n"
                f"  {base}/health/cron\n"
                f"  {base}/metrics\n"
                f"  {base}/jobs/daily-snapshots/runs\n"
                f"  {base}/jobs/refresh-stale-connections/runs\n"
                f"sandbox bank: {bank_url}\n"
                f"sandbox rates: {fiat_url}\n               {crypto_url}\n"
                f"{konto_lines(demo_settings, path)}"
                "and try, in another terminal (the demo's database and sandboxes):\n"
                f"  export {env}\n"
                "  kontod history\n"
                "  kontod runs daily-snapshots\n"
                "  kontod jobs run daily-snapshots\n"
                "  kontod jobs pause refresh-stale-connections --reason 'bank maintenance' --until 2h\n"
                "Ctrl-C stops it.\n",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
        finally:
            await daemon.stop()
    return 0
