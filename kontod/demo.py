"""``kontod demo``: an embedded database with demo users, a sandbox bank, and the daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import signal
import sys

import asyncpg
import structlog

from kontod import sandbox, tokens
from kontod.config import Settings
from kontod.daemon import Daemon
from kontod.runner import Skipped

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
INSERT INTO assets (user_id, type, name, purchase_price, current_value) VALUES
    (1, 'real_estate', 'Appartement', 210000.00, 248500.00),
    (1, 'vehicle', 'Voiture', 18000.00, NULL),
    (2, 'valuable', 'Montre', NULL, NULL);
SELECT setval(pg_get_serial_sequence('users', 'id'), 3);
"""


# The demo's token encryption key, used when no KONTOD_DB_ENCRYPTION_KEY is set: public, so
# that the demo database looks like the web app's (tokens stored encrypted).
DEMO_KEY = bytes.fromhex("6b6f6e746f642064656d6f206b6579" + "00" * 17)


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
    """What to put before a ``kontod`` command so that it opens the demo's database and bank.

    The demo keeps its embedded database apart from the default one (in
    ``KONTOD_STATE_DIR/demo``), so the other commands need to be told where it is.
    """
    parts = []
    if settings.database_url is None:
        parts.append(f"KONTOD_STATE_DIR={shlex.quote(str(settings.state_dir))}")
    if settings.powens_url is not None:
        parts.append(f"KONTOD_POWENS_URL={shlex.quote(settings.powens_url)}")
    if settings.db_encryption_key == DEMO_KEY:
        # The demo's own key is public; a key of the user's own is a secret and never printed.
        parts.append(f"KONTOD_DB_ENCRYPTION_KEY={DEMO_KEY.hex()}")
    return "".join(part + " " for part in parts)


async def demo(settings: Settings) -> int:
    """Run the demo until Ctrl-C."""

    key = settings.db_encryption_key or DEMO_KEY
    demo_settings = dataclasses.replace(
        settings,
        database_url=settings.database_url,
        state_dir=settings.state_dir / "demo",
        db_encryption_key=key,
    )

    async def seed_once(pool: asyncpg.Pool) -> None:
        if await seed(pool, key):
            log.info("demo.seeded", users=3)

    async with sandbox.serve() as bank_url:
        demo_settings = dataclasses.replace(demo_settings, powens_url=bank_url)
        daemon = Daemon(demo_settings, on_migrated=seed_once)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await daemon.start()
        try:
            assert daemon.runner is not None
            # Show every job at work now rather than at its next tick.
            started = []
            for name in daemon.runner.jobs:
                task = daemon.runner.active(name)
                if task is None:
                    outcome = await daemon.runner.trigger(
                        name, "manual", requested_by="demo", reason="kontod demo start"
                    )
                    task = None if isinstance(outcome, Skipped) else outcome.task
                if task is not None:
                    started.append(task)
            await asyncio.gather(*started)
            base = f"http://{demo_settings.listen_host}:{daemon.port}"
            env = demo_env(demo_settings)
            print(
                "\nkontod demo is running; open:\n"
                f"  {base}/\n"
                f"  {base}/health/cron\n"
                f"  {base}/metrics\n"
                f"  {base}/jobs/daily-snapshots/runs\n"
                f"  {base}/jobs/refresh-stale-connections/runs\n"
                f"sandbox bank: {bank_url}\n"
                "and try, in another terminal (same database):\n"
                f"  {env}kontod history\n"
                f"  {env}kontod runs daily-snapshots\n"
                f"  {env}kontod jobs run daily-snapshots\n"
                f"  {env}kontod jobs pause refresh-stale-connections --reason 'bank maintenance' --until 2h\n"
                "Ctrl-C stops it.\n",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
        finally:
            await daemon.stop()
    return 0
