"""The ``refresh-stale-connections`` job: fresh balances and first transactions from Powens.

Stale accounts are Powens accounts never synced, synced longer ago than ``stale_after``, or
with no transaction at all. Each user owning one is refreshed with the token of one of their
``active`` connections, at most ``concurrency`` users at a time. A user's failure is logged,
counted and recorded on the connection; the run fails only when no user could be refreshed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from kontod.classify import classify
from kontod.job import JobBody, RunContext
from kontod.powens import PowensClient, ProviderAccount, ProviderError, ProviderTransaction

COUNT_KEYS = (
    "users",
    "stale_accounts",
    "items_refreshed",
    "items_failed",
    "items_skipped",
    "accounts_updated",
    "transactions_inserted",
    "accounts_not_returned",
)
# Reasons stored on a connection are cut to this many characters.
MAX_REASON = 1000

# One row per user owning a stale account: the user's Powens accounts as parallel arrays, and
# one active connection, preferring one whose last refresh did not fail, then the newest.
STALE_USERS_SQL = """
WITH acc AS (
    SELECT a.id, a.user_id, a.provider_account_id, a.name, a.company_id IS NOT NULL AS company,
           EXISTS (SELECT 1 FROM transactions t WHERE t.bank_account_id = a.id) AS has_tx,
           a.last_sync
      FROM bank_accounts a
     WHERE a.provider = 'powens'
), per_user AS (
    SELECT user_id,
           count(*) FILTER (WHERE last_sync IS NULL OR last_sync < $1 OR NOT has_tx) AS stale,
           array_agg(id ORDER BY id) AS ids,
           array_agg(provider_account_id ORDER BY id) AS provider_ids,
           array_agg(name ORDER BY id) AS names,
           array_agg(company ORDER BY id) AS companies,
           array_agg(has_tx ORDER BY id) AS has_txs
      FROM acc
     GROUP BY user_id
    HAVING count(*) FILTER (WHERE last_sync IS NULL OR last_sync < $1 OR NOT has_tx) > 0
)
SELECT p.*, c.id AS connection_id, c.powens_token AS token
  FROM per_user p
  LEFT JOIN LATERAL (
       SELECT id, powens_token FROM bank_connections
        WHERE user_id = p.user_id AND status = 'active'
        ORDER BY last_refresh_error IS NOT NULL, id DESC
        LIMIT 1) c ON true
 ORDER BY p.user_id
"""

STALE_COUNT_SQL = """
SELECT count(*) FROM bank_accounts a
 WHERE a.provider = 'powens'
   AND (a.last_sync IS NULL OR a.last_sync < $1
        OR NOT EXISTS (SELECT 1 FROM transactions t WHERE t.bank_account_id = a.id))
"""

UPDATE_ACCOUNTS_SQL = """
UPDATE bank_accounts a
   SET balance = u.balance, last_sync = now(), type = u.type, usage = u.usage,
       subtype = u.subtype
  FROM unnest($1::bigint[], $2::numeric[], $3::text[], $4::text[], $5::text[])
       AS u (id, balance, type, usage, subtype)
 WHERE a.id = u.id
"""

# ON CONFLICT makes a second import of the same provider transactions insert nothing, even
# from two runs racing each other.
INSERT_TRANSACTIONS_SQL = """
WITH inserted AS (
    INSERT INTO transactions
           (bank_account_id, provider_transaction_id, date, amount, label, category)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::date[], $4::numeric[], $5::text[],
                         $6::text[])
    ON CONFLICT (bank_account_id, provider_transaction_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted
"""

# Only kontod's own columns: `status` and `last_sync` belong to the web app.
RECORD_OUTCOME_SQL = """
UPDATE bank_connections
   SET last_refresh_at = now(),
       last_refresh_error = $2::text,
       last_refresh_error_at = CASE WHEN $2::text IS NULL THEN NULL ELSE now() END
 WHERE id = $1
"""


class RefreshFailed(Exception):
    """No user could be refreshed: the provider, or kontod's access to it, is not working."""


@dataclass(frozen=True)
class LocalAccount:
    """A user's Powens account in Konto's database."""

    id: int
    provider_id: str | None
    name: str | None
    has_company: bool
    has_transactions: bool


@dataclass(frozen=True)
class Connection:
    """The active connection whose token refreshes a user; the token is kept out of repr."""

    id: int
    token: str = field(repr=False)


@dataclass(frozen=True)
class StaleUser:
    """A user owning at least one stale account, and the connection to refresh it with."""

    user_id: int
    stale_accounts: int
    accounts: list[LocalAccount]
    connection: Connection | None


@dataclass
class _Tally:
    refreshed: int = 0
    failed: int = 0
    first_failure: str | None = None


def make_body(
    pool: asyncpg.Pool,
    client: PowensClient,
    *,
    stale_after: timedelta,
    concurrency: int,
    transactions_limit: int = 100,
) -> JobBody:
    """The job body: refresh every user owning a stale account, ``concurrency`` at a time."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")

    async def body(ctx: RunContext) -> None:
        cutoff = ctx.started_at - stale_after
        users = await stale_users(pool, cutoff)
        # Zeros are written too, so a run's stored counts always show every outcome.
        ctx.counts.update(dict.fromkeys(COUNT_KEYS, 0))
        ctx.counts["users"] = len(users)
        ctx.counts["stale_accounts"] = sum(u.stale_accounts for u in users)
        ctx.log.info(
            "refresh.started",
            users=len(users),
            stale_accounts=ctx.counts["stale_accounts"],
            cutoff=cutoff.isoformat(),
            concurrency=concurrency,
        )
        tally = _Tally()
        todo: list[tuple[StaleUser, Connection]] = []
        for user in users:
            if user.connection is None:
                ctx.counts["items_skipped"] += 1
                ctx.log.info(
                    "refresh.user_skipped",
                    user_id=user.user_id,
                    reason="no_active_connection",
                    stale_accounts=user.stale_accounts,
                )
            else:
                todo.append((user, user.connection))
        queue = iter(todo)

        async def worker() -> None:
            # Workers share one iterator: each user is taken once, and at most ``concurrency``
            # users are in flight, with as many tasks whatever the number of users.
            for user, connection in queue:
                await _refresh_user(pool, client, ctx, user, connection, tally, transactions_limit)

        try:
            async with asyncio.TaskGroup() as group:
                for n in range(min(concurrency, len(todo))):
                    group.create_task(worker(), name=f"refresh-worker-{n}")
        except ExceptionGroup as errors:
            # A failure that is not the provider's (the database, a bug) ends the run; the
            # first one is the cause worth reporting, not the group around it.
            raise errors.exceptions[0] from None

        ctx.counts["stale_accounts_after"] = await pool.fetchval(STALE_COUNT_SQL, cutoff)
        ctx.log.info(
            "refresh.finished",
            refreshed=tally.refreshed,
            failed=tally.failed,
            skipped=ctx.counts["items_skipped"],
            accounts_updated=ctx.counts["accounts_updated"],
            transactions_inserted=ctx.counts["transactions_inserted"],
            stale_accounts_after=ctx.counts["stale_accounts_after"],
        )
        if tally.failed and not tally.refreshed:
            raise RefreshFailed(
                f"all {tally.failed} users with an active connection failed to refresh;"
                f" first failure: {tally.first_failure}"
            )

    return body


async def stale_users(pool: asyncpg.Pool, cutoff: datetime) -> list[StaleUser]:
    """Every user owning a Powens account synced before ``cutoff``, never, or without transactions."""
    rows = await pool.fetch(STALE_USERS_SQL, cutoff)
    return [
        StaleUser(
            user_id=r["user_id"],
            stale_accounts=r["stale"],
            accounts=[
                LocalAccount(*fields)
                for fields in zip(
                    r["ids"],
                    r["provider_ids"],
                    r["names"],
                    r["companies"],
                    r["has_txs"],
                    strict=True,
                )
            ],
            connection=None
            if r["connection_id"] is None
            else Connection(r["connection_id"], r["token"]),
        )
        for r in rows
    ]


async def _refresh_user(
    pool: asyncpg.Pool,
    client: PowensClient,
    ctx: RunContext,
    user: StaleUser,
    connection: Connection,
    tally: _Tally,
    transactions_limit: int,
) -> None:
    failure: ProviderError | None = None
    updated = inserted = 0
    try:
        remote = await client.accounts(connection.token)
    except ProviderError as exc:
        failure = exc
    else:
        matched = _match(user.accounts, remote)
        updated = await _update_accounts(pool, matched)
        new: list[tuple[int, ProviderTransaction]] = []
        for account, locals_ in matched.items():
            wanting = [local.id for local in locals_ if not local.has_transactions]
            if not wanting:
                continue
            try:
                txs = await client.transactions(
                    connection.token, account.id, limit=transactions_limit
                )
            except ProviderError as exc:
                # Keep what the other accounts gave; this account stays stale for next time.
                failure = exc
                break
            new.extend((local_id, tx) for local_id in wanting for tx in txs)
        inserted = await _insert_transactions(pool, new)
        returned = {r.id for r in remote}
        missing = [a.id for a in user.accounts if a.provider_id not in returned]
        if missing:
            # Accounts closed at the bank or linked through another connection: worth seeing,
            # not a failure.
            ctx.counts["accounts_not_returned"] += len(missing)
            ctx.log.info(
                "refresh.accounts_not_returned",
                user_id=user.user_id,
                connection_id=connection.id,
                account_ids=missing,
            )

    ctx.counts["accounts_updated"] += updated
    ctx.counts["transactions_inserted"] += inserted
    reason = None if failure is None else str(failure)[:MAX_REASON]
    await pool.execute(RECORD_OUTCOME_SQL, connection.id, reason)
    if failure is None:
        tally.refreshed += 1
        ctx.counts["items_refreshed"] += 1
        ctx.log.debug(
            "refresh.user_refreshed",
            user_id=user.user_id,
            connection_id=connection.id,
            accounts_updated=updated,
            transactions_inserted=inserted,
        )
        return
    tally.failed += 1
    tally.first_failure = tally.first_failure or reason
    ctx.counts["items_failed"] += 1
    ctx.log.warning(
        "refresh.user_failed",
        user_id=user.user_id,
        connection_id=connection.id,
        endpoint=failure.endpoint,
        kind=failure.kind,
        status=failure.status,
        reason=reason,
        accounts_updated=updated,
        transactions_inserted=inserted,
    )


def _match(
    local: list[LocalAccount], remote: list[ProviderAccount]
) -> dict[ProviderAccount, list[LocalAccount]]:
    """Each provider account with the local accounts carrying its id (usually one)."""
    by_id: defaultdict[str, list[LocalAccount]] = defaultdict(list)
    for account in local:
        if account.provider_id is not None:
            by_id[account.provider_id].append(account)
    return {r: by_id[r.id] for r in remote if r.id in by_id}


async def _update_accounts(
    pool: asyncpg.Pool, matched: dict[ProviderAccount, list[LocalAccount]]
) -> int:
    """Balance, last_sync and classification of every matched account, in one statement."""
    ids, balances, types, usages, subtypes = [], [], [], [], []
    for remote, locals_ in matched.items():
        for local in locals_:
            kind = classify(
                provider_type=remote.type,
                name=remote.name or local.name,
                usage=remote.usage,
                has_company=local.has_company,
            )
            ids.append(local.id)
            balances.append(remote.balance)
            types.append(kind.type)
            usages.append(kind.usage)
            subtypes.append(kind.subtype)
    if not ids:
        return 0
    status = await pool.execute(UPDATE_ACCOUNTS_SQL, ids, balances, types, usages, subtypes)
    return int(status.split()[-1])


async def _insert_transactions(
    pool: asyncpg.Pool, rows: list[tuple[int, ProviderTransaction]]
) -> int:
    """Insert the transactions not yet known for their account; return how many were new."""
    if not rows:
        return 0
    inserted: int = await pool.fetchval(
        INSERT_TRANSACTIONS_SQL,
        [account_id for account_id, _ in rows],
        [tx.id for _, tx in rows],
        [tx.date for _, tx in rows],
        [tx.amount for _, tx in rows],
        [tx.label for _, tx in rows],
        [tx.category for _, tx in rows],
    )
    return inserted
