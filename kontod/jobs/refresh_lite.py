"""The refresh job on a Konto whose tables are in the web app's SQLite/libSQL database.

The rules, the provider calls and every decision are those of ``kontod.jobs.refresh`` (its
pure core and the shell ``_Refresh``, which ``LiteRefresh`` extends); only the database side
differs. Konto's tables (``bank_accounts``, ``bank_connections``, ``transactions``) are read and
written through the ``KontoSql`` engine; what kontod remembers (``kontod_accounts``,
``kontod_connections``) stays in PostgreSQL. The joins the PostgreSQL path makes in SQL are made
in Python, set-based: each step reads each table once for all the users it needs (Konto's rows
from the Konto engine, kontod's by id array from PostgreSQL), never once per user or account.

Writes, per user: one fenced Konto transaction (``FencedWriter``) with every connection's part,
rows passed as one JSON parameter each and expanded with ``json_each``; then kontod's own
records in one PostgreSQL transaction. SQLite has no savepoint kontod could roll back to from a
statement list, so when a statement is refused (a foreign key, as when the web app deletes an
account mid-run) and the user has several connections, each connection's part is written again
in a transaction of its own: the refused part fails its connection alone, as on PostgreSQL.

Should kontod die (or PostgreSQL fail) between the Konto transaction and the PostgreSQL record,
Konto has the bank data and kontod does not remember importing it. The next run is still right:
the account is fresh by its ``last_sync`` until it is stale again, and then kontod asks Powens
for the transactions since its last *recorded* import, which the upsert on ``(bank_account_id,
tx_hash)`` finds already there (unchanged rows are not even rewritten); a hold that was not
recorded only means the connection is asked once more. Every write is an idempotent upsert, so
nothing is doubled.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal

import asyncpg

from kontod.jobs.refresh import (
    CONNECTIONS,
    HOLD_UNTIL,
    NEEDS_USER,
    STALE,
    STALE_REASONS,
    BankConnection,
    ConnectionPlan,
    ConnectionRecord,
    Failure,
    LocalAccount,
    Plan,
    StaleUser,
    _columns,
    _Refresh,
    connections_to_ask,
    failure_of,
    hold_columns,
)
from kontod.konto import lite_schema, tokens
from kontod.konto.fenced import FencedWriter
from kontod.konto.lite_schema import LiteSchema
from kontod.konto.schema import KontoSchema, KontoSchemaError
from kontod.konto.store import (
    KontoBusy,
    KontoError,
    KontoSql,
    KontoUnavailable,
    Row,
    Statement,
    Value,
)
from kontod.providers.powens import PowensClient
from kontod.scheduler.contract import ClaimLost, JobBody, RunContext

# Konto's side, read through the engine, READ_CHUNK rows or users a statement: each read holds
# SQLite's shared lock while it runs, and in the rollback-journal mode a writer's commit (the
# web app's) waits for it; 10 000 rows take about 15 ms. Every Powens account: the stale rule
# needs last_sync parsed in Python (``read_time``), and the same scan gives the accounts of
# the stale users. Parameters of the scans: the last id read, then READ_CHUNK.
READ_CHUNK = 10_000
POWENS_ACCOUNTS_SQL = """
SELECT id, user_id, provider_account_id, name, company_id IS NOT NULL, last_sync
  FROM bank_accounts WHERE provider = 'powens' AND id > ? ORDER BY id LIMIT ?"""
ACTIVE_CONNECTIONS_SQL = """
SELECT id, user_id, powens_connection_id, powens_token FROM bank_connections
 WHERE status = 'active' AND user_id IN (SELECT value FROM json_each(?))
 ORDER BY user_id, id"""
ALL_ACTIVE_CONNECTIONS_SQL = """
SELECT id, user_id FROM bank_connections
 WHERE status = 'active' AND id > ? ORDER BY id LIMIT ?"""

# Konto's side, written in the user's fenced transaction; one JSON array of rows each.
UPDATE_ACCOUNTS_SQL = """
UPDATE bank_accounts AS a
   SET balance = coalesce(u.balance, a.balance),
       last_sync = coalesce(u.last_sync, a.last_sync),
       currency = coalesce(u.currency, a.currency),
       type = u.type, usage = u.usage, subtype = u.subtype
  FROM (SELECT value->>0 AS id, value->>1 AS balance, value->>2 AS last_sync,
               value->>3 AS currency, value->>4 AS type, value->>5 AS usage,
               value->>6 AS subtype
          FROM json_each(?)) AS u
 WHERE a.id = u.id"""
# New rows get a rowid above every existing one (the write lock is held), so the rowids the
# upsert returns tell inserted rows from updated ones. Unchanged rows are not touched.
MAX_ROWID_SQL = "SELECT coalesce(max(rowid), 0) FROM transactions"
# "WHERE true": SQLite's grammar needs it between a SELECT's FROM and ON CONFLICT.
UPSERT_TRANSACTIONS_SQL = """
INSERT INTO transactions (bank_account_id, date, amount, label, category, tx_hash)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5
  FROM json_each(?) WHERE true
ON CONFLICT (bank_account_id, tx_hash) DO UPDATE
   SET date = excluded.date, amount = excluded.amount, label = excluded.label,
       category = excluded.category
 WHERE transactions.date IS NOT excluded.date OR transactions.amount IS NOT excluded.amount
    OR transactions.label IS NOT excluded.label
    OR transactions.category IS NOT excluded.category
RETURNING rowid"""
DELETE_TRANSACTIONS_SQL = """
DELETE FROM transactions
 WHERE (bank_account_id, tx_hash) IN (SELECT value->>0, value->>1 FROM json_each(?))"""

# kontod's side, in PostgreSQL, by the ids Konto's rows gave.
KONTOD_ACCOUNTS_SQL = """
SELECT bank_account_id AS id, connection_id,
       deleted_at IS NOT NULL OR disabled_at IS NOT NULL AS gone,
       powens_last_update, transactions_last_update, transactions_imported_at
  FROM kontod_accounts WHERE bank_account_id = ANY($1::bigint[])"""
# The holds of Konto's active connections ($1 ids, $5 fingerprints, $6 Powens ids), decided by
# the same SQL as the PostgreSQL path's.
HOLDS_SQL = f"""
SELECT u.id, {hold_columns("u.fingerprint", "u.powens_id")}
  FROM unnest($1::bigint[], $5::text[], $6::text[]) AS u (id, fingerprint, powens_id)
  LEFT JOIN kontod_connections k ON k.connection_id = u.id
  {HOLD_UNTIL}"""
KONTOD_CONNECTIONS_SQL = """
SELECT connection_id AS id, error_kind, powens_state
  FROM kontod_connections WHERE connection_id = ANY($1::bigint[])"""

# What PostgreSQL's timestamptz input takes of the text the web app writes, as kontod reads it
# here: an ISO date, optionally a time (T, t or a space between), optionally a zone after the
# time. A subset of PostgreSQL's forms (kontod_try_timestamptz), so that text is never read as
# fresher than on PostgreSQL: any other text is unreadable, its account stale and asked again.
TIME_TEXT = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r" ?(?:[Zz]|([+-])(\d{2})(?::?(\d{2}))?)?)?"
)
SPECIAL_TIMES = {
    "infinity": datetime.max.replace(tzinfo=UTC),
    "-infinity": datetime.min.replace(tzinfo=UTC),
    "epoch": datetime(1970, 1, 1, tzinfo=UTC),
}
MICRO = Decimal("0.000001")


def read_time(value: object) -> datetime | None:
    """Konto's text time as ``kontod_try_timestamptz`` reads it, or None when unreadable.

    A time without a zone is UTC: the web app writes UTC (``toISOString``, SQLite's
    ``datetime('now')``); PostgreSQL would use its session's time zone.
    """
    if not isinstance(value, str):
        return None
    text = value.strip(" ")
    special = SPECIAL_TIMES.get(text.lower())
    if special is not None:
        return special
    match = TIME_TEXT.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, zh, zm = match.groups()
    # PostgreSQL rounds a longer fraction to the microsecond, half to even.
    micro = (
        int(Decimal(f"0.{fraction}").quantize(MICRO, ROUND_HALF_EVEN) * 1_000_000)
        if fraction
        else 0
    )
    zone = UTC
    if sign is not None:
        offset = timedelta(hours=int(zh), minutes=int(zm or 0))
        zone = timezone(-offset if sign == "-" else offset)
    try:
        parsed = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=zone,
        )
        return parsed + timedelta(microseconds=micro)
    except (ValueError, OverflowError):
        return None


def as_konto_schema(lite: LiteSchema) -> KontoSchema:
    """Konto's SQLite columns as the casts ``plan`` encodes values by, so that each value is
    written as the column stores it: money as a float (REAL), times and dates as the web app's
    text; a money or time column of another type is refused by name."""
    casts = {key: _cast(declared) for key, declared in lite.types.items()}
    wanted = {
        ("bank_accounts", "balance"): "double precision",
        ("transactions", "amount"): "double precision",
        ("bank_accounts", "last_sync"): "text",
        ("transactions", "date"): "text",
    }
    for (table, column), cast in wanted.items():
        if casts[(table, column)] != cast:
            raise KontoSchemaError(
                f"Konto's column {table}.{column} is declared"
                f" {lite.declared(table, column) or 'without a type'};"
                f" kontod writes it as {'REAL' if cast != 'text' else 'TEXT'}"
            )
    return KontoSchema(casts)


def _cast(declared: str) -> str:
    """A declared SQLite type as the cast of the same affinity (SQLite's rules, in order)."""
    if "INT" in declared:
        return "bigint"
    if any(name in declared for name in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if "BLOB" in declared or not declared:
        return "blob"
    return "double precision"  # REAL, and NUMERIC, which keeps a float as one


def make_body(
    pool: asyncpg.Pool,
    client: PowensClient,
    konto: KontoSql,
    *,
    stale_after: timedelta,
    concurrency: int,
    key: bytes | None,
    token_hold: timedelta,
) -> JobBody:
    """The job body on Konto's SQLite-family database ``konto``; kontod's tables in ``pool``."""

    async def body(ctx: RunContext) -> None:
        # The fence first: a late transaction of an older run fails from now on, and anything
        # it wrote before is what this run reads.
        writer = await FencedWriter.start(konto, pool, ctx)
        schema = as_konto_schema(await lite_schema.load(konto))
        job = LiteRefresh(pool, client, schema, ctx, key, token_hold, konto, writer)
        await job.run(ctx.started_at - stale_after, concurrency)

    return body


@dataclass(frozen=True, slots=True)  # one per Powens account: 500 000 at 100 000 users
class KontoAccount:
    """A Powens account as Konto's database holds it."""

    id: int
    user_id: int | None
    provider_id: str | None
    name: str | None
    has_company: bool
    last_sync: datetime | None


class LiteRefresh(_Refresh):
    """One run of the job on a SQLite-family Konto: ``_Refresh`` with its database side here."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: PowensClient,
        schema: KontoSchema,
        ctx: RunContext,
        key: bytes | None,
        token_hold: timedelta,
        konto: KontoSql,
        writer: FencedWriter,
    ) -> None:
        super().__init__(pool, client, schema, ctx, key, token_hold)
        self.konto = konto
        self.writer = writer
        # One Konto write of this run at a time, whatever the concurrency: SQLite lets one
        # writer in, and kontod's users queuing for the lock on a libSQL server would keep
        # each other (and the web app) waiting in busy retries.
        self.one_writer = asyncio.Lock()

    async def check_key(self, key: bytes) -> None:
        rows = await self.konto.read(tokens.LITE_KEY_SAMPLE_SQL, (tokens.KEY_CHECK_SAMPLE,))
        tokens.check_key_rows([r[0] for r in rows if isinstance(r[0], str)], key)

    async def _scan(self, sql: str) -> AsyncIterator[Row]:
        """Every row of a scan (``sql``: its first column the id, its parameters the last id
        read and the chunk size), ``READ_CHUNK`` rows a statement, in id order."""
        last: Value = -(2**63)
        while True:
            chunk = await self.konto.read(sql, (last, READ_CHUNK))
            for row in chunk:
                yield row
            if len(chunk) < READ_CHUNK:
                return
            last = chunk[-1][0]

    async def _powens_accounts(self) -> list[KontoAccount]:
        """Every Powens account, by id."""
        times: dict[object, datetime | None] = {}
        out = []
        async for r in self._scan(POWENS_ACCOUNTS_SQL):
            account_id, user_id, provider_id, name, company, last_sync = r
            if not isinstance(account_id, int) or not isinstance(user_id, int | None):
                continue
            if last_sync not in times:  # many accounts share a time: parse each text once
                times[last_sync] = read_time(last_sync)
            out.append(
                KontoAccount(
                    account_id,
                    user_id,
                    _text(provider_id),
                    _text(name),
                    bool(company),
                    times[last_sync],
                )
            )
        return out

    async def _kontod_accounts(self, ids: list[int]) -> dict[int, asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return {r["id"]: r for r in await conn.fetch(KONTOD_ACCOUNTS_SQL, ids)}

    async def stale_users(self, cutoff: datetime) -> list[StaleUser]:
        """Every user owning a stale account, with the connections to ask: two reads of Konto's
        database, two of kontod's."""
        accounts = await self._powens_accounts()
        maybe = {a.user_id for a in accounts if a.last_sync is None or a.last_sync < cutoff}
        mine = [a for a in accounts if a.user_id in maybe]
        kept = await self._kontod_accounts([a.id for a in mine])
        stale = stale_accounts(cutoff, mine, kept)
        by_user: defaultdict[int | None, list[KontoAccount]] = defaultdict(list)
        for a in stale:
            by_user[a.user_id].append(a)
        # As PostgreSQL orders them: the accounts without a user last, with no connection and
        # no account of their own (``user_id = ANY(...)`` is never true for NULL).
        user_ids = sorted(by_user, key=lambda u: (u is None, u or 0))
        connections = await self._connections([u for u in user_ids if u is not None])
        local: defaultdict[int | None, list[LocalAccount]] = defaultdict(list)
        for a in mine:
            if a.user_id is not None and a.user_id in by_user:
                k = kept.get(a.id)
                local[a.user_id].append(
                    LocalAccount(
                        id=a.id,
                        provider_id=a.provider_id,
                        name=a.name,
                        has_company=a.has_company,
                        powens_last_update=k["powens_last_update"] if k else None,
                        transactions_last_update=k["transactions_last_update"] if k else None,
                        transactions_imported=k is not None
                        and k["transactions_imported_at"] is not None,
                    )
                )
        users = []
        for user_id in user_ids:
            links = [
                kept[a.id]["connection_id"] if a.id in kept else None for a in by_user[user_id]
            ]
            to_call, held = connections_to_ask(
                connections[user_id], {c for c in links if c is not None}, None in links
            )
            users.append(
                StaleUser(
                    user_id=user_id,
                    stale_accounts=len(by_user[user_id]),
                    accounts=local[user_id],
                    to_call=to_call,
                    held=held,
                )
            )
        return users

    async def _connections(
        self, user_ids: list[int]
    ) -> defaultdict[int | None, list[BankConnection]]:
        """The active connections of ``user_ids`` from Konto, each with its hold from kontod."""
        rows = [
            (r[0], r[1], _text(r[2]), r[3])
            for start in range(0, len(user_ids), READ_CHUNK)
            for r in await self.konto.read(
                ACTIVE_CONNECTIONS_SQL, (json.dumps(user_ids[start : start + READ_CHUNK]),)
            )
            if isinstance(r[0], int) and isinstance(r[1], int) and isinstance(r[3], str)
        ]
        prints = [tokens.fingerprint(stored) for _, _, _, stored in rows]
        async with self.pool.acquire() as conn:
            holds = {
                r["id"]: r
                for r in await conn.fetch(
                    HOLDS_SQL,
                    [r[0] for r in rows],
                    self.now,
                    self.key_fingerprint,
                    self.token_hold,
                    prints,
                    [r[2] for r in rows],
                )
            }
        out: defaultdict[int | None, list[BankConnection]] = defaultdict(list)
        for (connection_id, user_id, powens_id, stored), fingerprint in zip(
            rows, prints, strict=True
        ):
            hold = holds[connection_id]
            out[user_id].append(
                BankConnection(
                    id=connection_id,
                    powens_id=powens_id,
                    stored=stored,
                    fingerprint=fingerprint,
                    held=hold["held"],
                    held_until=hold["held_until"],
                    streak=hold["streak"],
                )
            )
        return out

    async def write_user(
        self, user: StaleUser, planned: Plan, failures: list[Failure | None]
    ) -> Counter[str]:
        """The user's parts in one fenced Konto transaction, then kontod's records of them in
        one PostgreSQL transaction. A lost claim, an engine that cannot be reached or stays
        busy raise (nothing of the user written); a refused statement fails its connection."""
        todo = [i for i, part in enumerate(planned.parts) if part.failure is None]
        for i in todo:
            self._emit(planned.parts[i].events)
        counts: Counter[str] = Counter()
        written: list[int] = []
        try:
            counts.update(await self._write_konto([planned.parts[i] for i in todo]))
            written = todo
        except (KontoBusy, KontoUnavailable):
            raise
        except KontoError as exc:
            if len(todo) == 1:
                self._part_failed(user, planned, failures, todo[0], exc, counts)
            else:
                # Which connection's part was refused: each alone, as a savepoint would tell.
                for i in todo:
                    try:
                        counts.update(await self._write_konto([planned.parts[i]]))
                        written.append(i)
                    except KontoError as part_exc:
                        self._part_failed(user, planned, failures, i, part_exc, counts)
        await self._record_written(user, planned, failures, written)
        if planned.not_returned and all(f is None for f in failures):
            counts["accounts_not_returned"] += len(planned.not_returned)
            self.ctx.log.info(
                "refresh.accounts_not_returned",
                user_id=user.user_id,
                account_ids=list(planned.not_returned),
            )
        return counts

    def _part_failed(
        self,
        user: StaleUser,
        planned: Plan,
        failures: list[Failure | None],
        i: int,
        exc: Exception,
        counts: Counter[str],
    ) -> None:
        failures[i] = failure = failure_of(exc)
        counts["connections_failed"] += 1
        self.ctx.log.warning(
            "refresh.connection_write_failed",
            user_id=user.user_id,
            connection_id=planned.parts[i].connection.id,
            kind=failure.kind,
            error=failure.reason,
        )

    async def _write_konto(self, parts: Sequence[ConnectionPlan]) -> Counter[str]:
        """``parts`` in one fenced Konto transaction; the counts its answers give."""
        steps: list[Statement] = []
        kinds: list[str] = []
        for part in parts:
            if part.accounts:
                steps.append(Statement(UPDATE_ACCOUNTS_SQL, (_json(part.accounts),)))
                kinds.append("accounts")
            if part.transactions:
                steps.append(Statement(MAX_ROWID_SQL))
                steps.append(Statement(UPSERT_TRANSACTIONS_SQL, (_json(part.transactions),)))
                kinds += ["max_rowid", "upsert"]
            if part.deleted:
                steps.append(Statement(DELETE_TRANSACTIONS_SQL, (_json(part.deleted),)))
                kinds.append("deleted")
        counts: Counter[str] = Counter()
        for part in parts:
            counts.update(part.counts)
        if not steps:
            return counts
        before = 0
        async with self.one_writer:
            results = await self.writer.write(steps)
        for kind, result in zip(kinds, results, strict=True):
            if kind == "accounts":
                counts["accounts_updated"] += result.changes
            elif kind == "max_rowid":
                before = int(result.rows[0][0] or 0)
            elif kind == "upsert":
                inserted = sum(1 for (rowid,) in result.rows if int(rowid or 0) > before)
                counts["transactions_inserted"] += inserted
                counts["transactions_updated"] += len(result.rows) - inserted
            else:
                counts["transactions_deleted"] += result.changes
        return counts

    async def _record_written(
        self, user: StaleUser, planned: Plan, failures: list[Failure | None], written: list[int]
    ) -> None:
        """kontod's records of every part in one PostgreSQL transaction: the accounts of the
        parts written to Konto, each connection's outcome. Konto's transaction is committed by
        now; should this one fail, the user counts as failed and the next run corrects it (see
        the module's doc)."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self.ctx.check_claim(conn)
                for i in written:
                    # One statement a part, as on PostgreSQL: two connections may see the same
                    # account, which one upsert statement cannot write twice.
                    if planned.parts[i].states:
                        await conn.execute(
                            self.sql.upsert_kontod_accounts,
                            *_columns(planned.parts[i].states),
                            self.now,
                        )
                await self.record(
                    conn,
                    [
                        part.record
                        if own is None or part.failure is not None
                        else ConnectionRecord.failed(part.connection, own)
                        for part, own in zip(planned.parts, failures, strict=True)
                    ],
                )
        except ClaimLost:
            raise
        except Exception as exc:
            failure = failure_of(exc)
            self.ctx.log.error(
                "refresh.record_failed",
                user_id=user.user_id,
                connection_ids=[p.connection.id for p in planned.parts],
                error=failure.reason,
            )
            for i in written:
                failures[i] = failures[i] or failure

    async def count_after(self, cutoff: datetime) -> None:
        """Stale accounts by reason and active connections by state, as the PostgreSQL path
        counts them, from Konto's rows and kontod's."""
        accounts = await self._powens_accounts()
        maybe = [a for a in accounts if a.last_sync is None or a.last_sync < cutoff]
        active = [
            (r[0], r[1])
            async for r in self._scan(ALL_ACTIVE_CONNECTIONS_SQL)
            if isinstance(r[0], int)
        ]
        kept = await self._kontod_accounts([a.id for a in maybe])
        async with self.pool.acquire() as conn:
            tried = {
                r["id"]: r for r in await conn.fetch(KONTOD_CONNECTIONS_SQL, [c for c, _ in active])
            }
        stale = stale_accounts(cutoff, maybe, kept)
        users_active: defaultdict[object, list[int]] = defaultdict(list)
        for connection_id, user_id in active:
            users_active[user_id].append(connection_id)
        active_ids = {c for c, _ in active}
        reasons: Counter[str] = Counter()
        for a in stale:
            k = kept.get(a.id)
            known = k["connection_id"] if k else None
            reasons[stale_reason(a, known, users_active[a.user_id], active_ids, tried)] += 1
        for reason in STALE_REASONS:
            self.ctx.set_in(STALE, reason, reasons[reason])
        self.ctx.counts["stale_accounts_after"] = sum(reasons.values())
        states: Counter[str] = Counter()
        for connection_id, _ in active:
            row = tried.get(connection_id)
            states[
                (row["error_kind"] or row["powens_state"] or "ok") if row else "never_tried"
            ] += 1
        self.ctx.set_in(CONNECTIONS, "ok", 0)  # present even with no connection
        for state, n in states.items():
            self.ctx.set_in(CONNECTIONS, state, n)


def stale_accounts(
    cutoff: datetime, accounts: list[KontoAccount], kept: dict[int, asyncpg.Record]
) -> list[KontoAccount]:
    """The stale accounts, by the PostgreSQL path's rule: last_sync missing, unreadable or
    older than ``cutoff``, unless kontod saw Powens delete or disable the account."""
    return [
        a
        for a in accounts
        if (a.last_sync is None or a.last_sync < cutoff)
        and not (a.id in kept and kept[a.id]["gone"])
    ]


def stale_reason(
    account: KontoAccount,
    known: int | None,
    users_active: list[int],
    active: set[int],
    tried: dict[int, asyncpg.Record],
) -> str:
    """Why a stale account is still stale (the PostgreSQL path's ``stale_reasons``): judged by
    the record of its own connection when known and active, else of its user's most troubled
    active one, the lowest id among equals where PostgreSQL takes any (``users_active``: its
    user's active connections; ``active``: everyone's)."""
    if not users_active:
        return "no_connection"
    if known is not None:
        seen = [tried[known]] if known in active and known in tried else []
    else:
        seen = [tried[c] for c in sorted(users_active) if c in tried]
    troubled = [r for r in seen if r["error_kind"] is not None or r["powens_state"] is not None]
    record = next(iter(troubled or seen), None)
    if record is not None:
        if record["error_kind"] == "token_rejected":
            return "token_rejected"
        if record["error_kind"] is None and record["powens_state"] in NEEDS_USER:
            return "needs_user"
        if record["error_kind"] is not None or record["powens_state"] is not None:
            return "provider_error"
    return "never_synced" if account.last_sync is None else "bank_data_old"


def _text(value: object) -> str | None:
    """A Konto value read as text, as PostgreSQL's ``::text`` would give it."""
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _json(rows: Iterable[tuple[object, ...]]) -> str:
    """Rows as one JSON array of arrays, the parameter ``json_each`` expands. Money is already
    a float (exact to the cent as the column's REAL holds it: SQLite reads JSON numbers back
    to the same double), times and dates already text."""
    return json.dumps([list(row) for row in rows], allow_nan=False)
