"""The ``refresh-stale-connections`` job: Konto's Powens accounts brought up to what Powens has.

A Powens account is stale when its ``last_sync`` (the bank data's own time, Powens'
``last_update``) is missing or older than ``stale_after``, unless Powens reported it deleted or
disabled. Each user owning a stale account is refreshed through their active connections (one
Powens user and token each), at most ``concurrency`` users at a time:

- the connection's state (``GET /users/me/connections``), its accounts, deleted and disabled
  ones included (``GET /users/me/accounts?all``), and, for each account whose bank data changed
  since the last import, the transactions changed since then, every page;
- a connection is not called again while it is held: after a 401 for ``token_hold`` (a week
  by default), and while the bank needs the user (SCA, a password...) for a back-off that
  doubles from a day up to a week; a change of the stored token, of the key or of the Powens
  connection id lifts either hold;
- everything one user brings is written in one transaction, each connection's part in a
  savepoint of its own, so that one connection's bad write leaves the others' data; any
  failure (the provider, a token, the database, a bug) is counted, logged and recorded in
  ``kontod_connections`` and the run goes on. The run fails only when no user could be
  refreshed, or when it loses its claim. An amount that is not finite or beyond 10^15 once
  in the column's type is refused for its account or transaction, and counted.

Konto's columns are written with values of their own types (see ``kontod.konto.schema``); what
kontod needs to remember lives in ``kontod_connections`` and ``kontod_accounts``.

The module reads top to bottom as the job runs: ``statements`` (the SQL, one attribute per
statement), the pure core (``connections_to_ask``, ``triage``, ``transactions_wanted``,
``plan``: every decision as plain data, with neither database nor HTTP), and the shell
(``_Refresh``) that reads, fetches, plans, and applies each user's plan in one fenced
transaction, adding the counts the database's answers give. When Konto's tables are in the web
app's SQLite/libSQL database, ``kontod.jobs.refresh_lite`` gives the shell its database side.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Literal, NamedTuple

import asyncpg

from kontod.konto import schema as konto_schema
from kontod.konto import tokens
from kontod.konto.classify import classify
from kontod.konto.schema import KontoSchema
from kontod.konto.store import KontoError, KontoSql
from kontod.providers.powens import (
    PowensClient,
    ProviderAccount,
    ProviderConnection,
    ProviderError,
    ProviderTransaction,
)
from kontod.scheduler.contract import (
    ClaimLost,
    Connection,
    CountFamily,
    JobBody,
    JobExports,
    RunContext,
    run_workers,
)

COUNT_KEYS = (
    "users",
    "stale_accounts",
    "items_refreshed",
    "items_failed",
    "items_skipped",
    "connections_called",
    "connections_held",
    "connections_failed",
    "connections_needing_user",
    "accounts_updated",
    "accounts_not_returned",
    "accounts_deleted",
    "accounts_disabled",
    "balances_null_kept",
    "accounts_invalid",
    "transactions_inserted",
    "transactions_updated",
    "transactions_deleted",
    "transactions_coming_skipped",
    "transactions_invalid",
    "stale_accounts_after",
)
# Powens connection states where syncing waits for the user (SCA, consent, password...).
NEEDS_USER = frozenset(
    {
        "SCARequired",
        "webauthRequired",
        "additionalInformationNeeded",
        "decoupled",
        "validating",
        "actionNeeded",
        "passwordExpired",
        "wrongpass",
    }
)
# Why a stale account is still stale after a run (the `reason` of the stale-accounts counts).
STALE_REASONS = (
    "needs_user",
    "token_rejected",
    "provider_error",
    "no_connection",
    "never_synced",
    "bank_data_old",
)
STATE_COUNT = "connections_state."
STALE_COUNT = "stale_accounts_after."
# Connections by state and stale accounts by reason, as of the last finished refresh. The
# states that need the user and every reason are exported even at 0, so that rules comparing
# with an hour or a day ago always have both sides.
CONNECTIONS = CountFamily(
    metric="kontod_provider_connections",
    doc="Active bank connections by Powens state (ok: synced fine) or kontod's error kind,"
    " as of the last refresh",
    prefix=STATE_COUNT,
    label="state",
    per_job=False,
    always=("ok", *sorted(NEEDS_USER)),
    in_run_counts=False,
)
STALE = CountFamily(
    metric="kontod_refresh_stale_accounts",
    doc="Bank accounts still stale after the last refresh, by reason",
    prefix=STALE_COUNT,
    label="reason",
    per_job=False,
    always=STALE_REASONS,
    shown_with=STATE_COUNT,
    in_run_counts=False,
)
EXPORTS = JobExports(families=(CONNECTIONS, STALE))
HOLD_FIRST = timedelta(days=1)
HOLD_MAX = timedelta(days=7)
# Longest a 401 holds a connection unless set otherwise (KONTOD_TOKEN_HOLD).
TOKEN_HOLD = timedelta(days=7)
# Amounts beyond this, once in the column's type, are refused: no bank holds that much, and a
# float column would take 1e400 as Infinity.
MAX_AMOUNT = Decimal(10) ** 15
# Errors stored on a connection are cut to this many characters.
MAX_REASON = 1000
TX_HASH_PREFIX = "powens_"


def needs_user_hold(streak: int) -> timedelta:
    """How long a connection needing the user is left alone after its ``streak``-th such answer."""
    return min(HOLD_MAX, HOLD_FIRST * (1 << min(8, max(0, streak - 1))))


def pg_text(text: str | None) -> str | None:
    """``text`` as PostgreSQL's text type takes it: NUL and lone surrogates become U+FFFD.

    Provider strings (error bodies, labels, states) can hold either through JSON escapes; both
    would make the whole statement fail.
    """
    if text is None:
        return None
    text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def plausible_amount(value: object) -> bool:
    """Whether a value about to be written as money is finite and within +-10^15 (None is)."""
    if value is None:
        return True
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return False
    return amount.is_finite() and abs(amount) <= MAX_AMOUNT


def _stale_filter(schema: KontoSchema) -> str:
    last_sync = schema.timestamptz("bank_accounts", "last_sync", "a")
    return f"""a.provider = 'powens'
       AND k.deleted_at IS NULL AND k.disabled_at IS NULL
       AND ({last_sync} IS NULL OR {last_sync} < $1)"""


# When a connection's hold ends (``h.until``), from its kontod_connections row ``k``.
HOLD_UNTIL = """CROSS JOIN LATERAL (SELECT CASE WHEN k.error_kind = 'token_rejected'
                                  THEN least(k.held_until, k.last_attempt_at + $4::interval)
                                  ELSE k.held_until END AS until) h"""


def hold_columns(fingerprint: str, powens_id: str) -> str:
    """The ``held_until``, ``held`` and ``streak`` columns of a connection (parameters $2: now,
    $3: the key's fingerprint, $4: the token hold), beside ``HOLD_UNTIL``; ``fingerprint`` and
    ``powens_id`` are the SQL of the stored token's fingerprint and of its Powens connection id.
    Both engines' reads decide holds with it."""
    return f"""h.until::text AS held_until,
       -- A hold stands only for what it was decided under: the same stored token, key and
       -- Powens connection; a 401 holds for $4 at most (rows from before held 'infinity').
       coalesce(h.until > $2 AND k.token_fingerprint = {fingerprint}
                AND k.key_fingerprint IS NOT DISTINCT FROM $3::text
                AND k.powens_connection_id IS NOT DISTINCT FROM {powens_id},
                false) AS held,
       coalesce(k.needs_user_streak, 0) AS streak"""


@dataclass(frozen=True)
class Statements:
    """The job's SQL, one attribute per statement, so that a misspelt name fails mypy."""

    stale_users: str
    connections: str
    accounts: str
    update_accounts: str
    upsert_transactions: str
    delete_transactions: str
    upsert_kontod_accounts: str
    record_connections: str
    stale_reasons: str
    connection_states: str


def statements(schema: KontoSchema) -> Statements:
    """The job's statements, with each Konto column's own type in its casts."""
    c = schema.cast
    stale = _stale_filter(schema)
    last_sync = schema.timestamptz("bank_accounts", "last_sync", "a")
    return Statements(
        # Users owning a stale account, and the connections their stale accounts were last
        # seen through (NULL: not known yet, so every active connection of the user is asked).
        stale_users=f"""
SELECT a.user_id::bigint AS user_id, count(*) AS stale,
       array_agg(DISTINCT k.connection_id) FILTER (WHERE k.connection_id IS NOT NULL) AS known,
       bool_or(k.connection_id IS NULL) AS unknown
  FROM bank_accounts a LEFT JOIN kontod_accounts k ON k.bank_account_id = a.id
 WHERE {stale}
 GROUP BY a.user_id ORDER BY a.user_id""",
        connections=f"""
SELECT c.id::bigint AS id, c.user_id::bigint AS user_id,
       c.powens_connection_id::text AS powens_id, c.powens_token::text AS stored,
       f.fingerprint,
       {hold_columns("f.fingerprint", "c.powens_connection_id::text")}
  FROM bank_connections c
  LEFT JOIN kontod_connections k ON k.connection_id = c.id
  CROSS JOIN LATERAL (SELECT encode(sha256(convert_to(c.powens_token::text, 'UTF8')), 'hex')
                             AS fingerprint) f
  {HOLD_UNTIL}
 WHERE c.user_id = ANY($1::bigint[]) AND c.status = 'active'
 ORDER BY c.user_id, c.id""",
        accounts="""
SELECT a.id::bigint AS id, a.user_id::bigint AS user_id,
       a.provider_account_id::text AS provider_id, a.name::text AS name,
       a.company_id IS NOT NULL AS company, k.powens_last_update,
       k.transactions_last_update, k.transactions_imported_at
  FROM bank_accounts a LEFT JOIN kontod_accounts k ON k.bank_account_id = a.id
 WHERE a.provider = 'powens' AND a.user_id = ANY($1::bigint[])
 ORDER BY a.id""",
        update_accounts=f"""
UPDATE bank_accounts a
   SET balance = coalesce(u.balance, a.balance),
       last_sync = coalesce(u.last_sync, a.last_sync),
       currency = coalesce(u.currency, a.currency),
       type = u.type, usage = u.usage, subtype = u.subtype
  FROM unnest($1::bigint[], $2::{c("bank_accounts", "balance")}[],
              $3::{c("bank_accounts", "last_sync")}[], $4::{c("bank_accounts", "currency")}[],
              $5::{c("bank_accounts", "type")}[], $6::{c("bank_accounts", "usage")}[],
              $7::{c("bank_accounts", "subtype")}[])
       AS u (id, balance, last_sync, currency, type, usage, subtype)
 WHERE a.id = u.id""",
        # The web app's key: a row it imported is updated, never doubled. xmax = 0 tells an
        # inserted row from an updated one; unchanged rows are not touched at all.
        upsert_transactions=f"""
WITH written AS (
    INSERT INTO transactions AS t (bank_account_id, date, amount, label, category, tx_hash)
    SELECT * FROM unnest($1::{c("transactions", "bank_account_id")}[],
                         $2::{c("transactions", "date")}[], $3::{c("transactions", "amount")}[],
                         $4::{c("transactions", "label")}[],
                         $5::{c("transactions", "category")}[],
                         $6::{c("transactions", "tx_hash")}[])
    ON CONFLICT (bank_account_id, tx_hash) DO UPDATE
       SET date = EXCLUDED.date, amount = EXCLUDED.amount, label = EXCLUDED.label,
           category = EXCLUDED.category
     WHERE (t.date, t.amount, t.label, t.category)
           IS DISTINCT FROM (EXCLUDED.date, EXCLUDED.amount, EXCLUDED.label, EXCLUDED.category)
    RETURNING xmax = 0 AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
  FROM written""",
        delete_transactions="""
DELETE FROM transactions t
 USING unnest($1::bigint[], $2::text[]) AS d (account_id, tx_hash)
 WHERE t.bank_account_id = d.account_id AND t.tx_hash = d.tx_hash""",
        upsert_kontod_accounts="""
INSERT INTO kontod_accounts AS k
       (bank_account_id, connection_id, powens_last_update, deleted_at, disabled_at,
        transactions_last_update, transactions_imported_at, null_balance_at)
SELECT u.id, u.connection_id, u.last_update,
       CASE WHEN u.deleted THEN $9::timestamptz END, CASE WHEN u.disabled THEN $9 END,
       u.tx_last_update, CASE WHEN u.imported THEN $9 END, CASE WHEN u.null_balance THEN $9 END
  FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bool[], $5::bool[],
              $6::timestamptz[], $7::bool[], $8::bool[])
       AS u (id, connection_id, last_update, deleted, disabled, tx_last_update, imported,
             null_balance)
ON CONFLICT (bank_account_id) DO UPDATE SET
       connection_id = EXCLUDED.connection_id,
       powens_last_update = coalesce(EXCLUDED.powens_last_update, k.powens_last_update),
       deleted_at = CASE WHEN EXCLUDED.deleted_at IS NULL THEN NULL
                         ELSE coalesce(k.deleted_at, EXCLUDED.deleted_at) END,
       disabled_at = CASE WHEN EXCLUDED.disabled_at IS NULL THEN NULL
                          ELSE coalesce(k.disabled_at, EXCLUDED.disabled_at) END,
       transactions_last_update = greatest(k.transactions_last_update,
                                           EXCLUDED.transactions_last_update),
       transactions_imported_at = coalesce(EXCLUDED.transactions_imported_at,
                                           k.transactions_imported_at),
       null_balance_at = coalesce(EXCLUDED.null_balance_at, k.null_balance_at)""",
        # One row per connection tried. A failure keeps what Powens said last time.
        record_connections="""
INSERT INTO kontod_connections AS k
       (connection_id, last_attempt_at, last_success_at, error_kind, error, error_code,
        powens_state, powens_error_message, powens_last_update, powens_next_try,
        token_fingerprint, held_until, needs_user_streak, powens_connection_id,
        key_fingerprint)
SELECT u.id, $14::timestamptz, CASE WHEN u.ok THEN $14 END, u.kind, u.error, u.code, u.state,
       u.message, u.last_update, u.next_try, u.fingerprint,
       -- A rejected token is held for $16, or until the token, key or connection changes.
       CASE WHEN u.kind = 'token_rejected' THEN $14 + $16::interval ELSE u.held_until END,
       coalesce(u.streak, 0), u.powens_id, $15::text
  FROM unnest($1::bigint[], $2::bool[], $3::text[], $4::text[], $5::text[], $6::text[],
              $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[],
              $11::timestamptz[], $12::int[], $13::text[])
       AS u (id, ok, kind, error, code, state, message, last_update, next_try, fingerprint,
             held_until, streak, powens_id)
ON CONFLICT (connection_id) DO UPDATE SET
       last_attempt_at = EXCLUDED.last_attempt_at,
       last_success_at = coalesce(EXCLUDED.last_success_at, k.last_success_at),
       error_kind = EXCLUDED.error_kind, error = EXCLUDED.error, error_code = EXCLUDED.error_code,
       powens_state = CASE WHEN EXCLUDED.last_success_at IS NULL THEN k.powens_state
                           ELSE EXCLUDED.powens_state END,
       powens_error_message = CASE WHEN EXCLUDED.last_success_at IS NULL
                                   THEN k.powens_error_message
                                   ELSE EXCLUDED.powens_error_message END,
       powens_last_update = coalesce(EXCLUDED.powens_last_update, k.powens_last_update),
       powens_next_try = CASE WHEN EXCLUDED.last_success_at IS NULL THEN k.powens_next_try
                              ELSE EXCLUDED.powens_next_try END,
       token_fingerprint = EXCLUDED.token_fingerprint,
       held_until = EXCLUDED.held_until,
       powens_connection_id = EXCLUDED.powens_connection_id,
       key_fingerprint = EXCLUDED.key_fingerprint,
       needs_user_streak = CASE WHEN EXCLUDED.last_success_at IS NULL
                                THEN k.needs_user_streak
                                ELSE EXCLUDED.needs_user_streak END""",
        # After the run: why each stale account is still stale. The account's own connection
        # when known, else the most troubled active connection of its user.
        stale_reasons=f"""
SELECT CASE
         WHEN NOT EXISTS (SELECT 1 FROM bank_connections c
                           WHERE c.user_id = a.user_id AND c.status = 'active')
           THEN 'no_connection'
         WHEN kc.error_kind = 'token_rejected' THEN 'token_rejected'
         WHEN kc.error_kind IS NULL AND kc.powens_state = ANY($2::text[]) THEN 'needs_user'
         WHEN kc.error_kind IS NOT NULL OR kc.powens_state IS NOT NULL THEN 'provider_error'
         WHEN {last_sync} IS NULL THEN 'never_synced'
         ELSE 'bank_data_old'
       END AS reason, count(*) AS accounts
  FROM bank_accounts a
  LEFT JOIN kontod_accounts k ON k.bank_account_id = a.id
  LEFT JOIN LATERAL (
       SELECT kc.error_kind, kc.powens_state
         FROM kontod_connections kc
         JOIN bank_connections c ON c.id = kc.connection_id AND c.status = 'active'
        WHERE CASE WHEN k.connection_id IS NOT NULL THEN kc.connection_id = k.connection_id
                   ELSE c.user_id = a.user_id END
        ORDER BY (kc.error_kind IS NOT NULL OR kc.powens_state IS NOT NULL) DESC
        LIMIT 1) kc ON true
 WHERE {stale}
 GROUP BY 1""",
        connection_states="""
SELECT coalesce(k.error_kind, k.powens_state,
                CASE WHEN k.connection_id IS NULL THEN 'never_tried' ELSE 'ok' END) AS state,
       count(*) AS connections
  FROM bank_connections c LEFT JOIN kontod_connections k ON k.connection_id = c.id
 WHERE c.status = 'active'
 GROUP BY 1""",
    )


class RefreshFailed(Exception):
    """No user could be refreshed: the provider, or kontod's access to it, is not working."""


@dataclass(frozen=True, slots=True)  # one per account or connection of every stale user
class LocalAccount:
    """A user's Powens account in Konto's database, with what kontod remembers of it."""

    id: int
    provider_id: str | None
    name: str | None
    has_company: bool
    powens_last_update: datetime | None
    transactions_last_update: datetime | None
    transactions_imported: bool

    def wants_transactions(self, remote: ProviderAccount) -> bool:
        """Never imported, or the bank data changed since kontod last saw it."""
        return (
            not self.transactions_imported
            or remote.last_update is None
            or self.powens_last_update is None
            or remote.last_update > self.powens_last_update
        )


@dataclass(frozen=True, slots=True)  # one per account or connection of every stale user
class BankConnection:
    """An active bank_connections row; the stored token is kept out of repr."""

    id: int
    powens_id: str | None
    stored: str = field(repr=False)
    fingerprint: str
    # Held by a 401 or a needs-user back-off, with the same stored token (decided in SQL).
    held: bool
    held_until: str | None
    streak: int


@dataclass
class StaleUser:
    """A user owning at least one stale account, the connections to ask and those held."""

    # None: the accounts the web app never gave a user (its user_id column came later); no
    # connection can refresh them, so they make one user, skipped.
    user_id: int | None
    stale_accounts: int
    accounts: list[LocalAccount]
    to_call: list[BankConnection]
    held: list[BankConnection]


@dataclass(frozen=True)
class Failure:
    """Why a connection brought or wrote nothing: a kind of few values, and a safe reason."""

    kind: str
    reason: str
    code: str | None = None


@dataclass
class Fetched:
    """What one connection brought, or why it brought nothing."""

    connection: BankConnection
    failure: Failure | None = None
    remote: ProviderConnection | None = None
    accounts: list[ProviderAccount] = field(default_factory=list)
    transactions: dict[str, list[ProviderTransaction]] = field(default_factory=dict)


KNOWN_FAILURES = (ProviderError, tokens.TokenEncryptedNoKey, tokens.TokenInvalid)


def failure_of(exc: Exception, *secrets: str) -> Failure:
    """The failure an exception stands for: its own kind, ``database`` or ``internal``.

    A message from outside kontod's own errors gets its type name and has ``secrets`` (the
    token) blotted out, since nothing says what it quotes.
    """
    if isinstance(exc, KNOWN_FAILURES):
        return Failure(exc.kind, str(exc)[:MAX_REASON], getattr(exc, "code", None))
    kind = "database" if isinstance(exc, asyncpg.PostgresError | KontoError) else "internal"
    reason = f"{type(exc).__name__}: {exc}"
    for secret in secrets:
        if secret:
            reason = reason.replace(secret, "***")
    return Failure(kind, reason[:MAX_REASON])


class ConnectionRecord(NamedTuple):
    """One kontod_connections row to write, in the order of the statement's parameters."""

    connection_id: int
    ok: bool
    error_kind: str | None
    error: str | None
    error_code: str | None
    powens_state: str | None
    powens_error_message: str | None
    powens_last_update: datetime | None
    powens_next_try: datetime | None
    token_fingerprint: str
    held_until: datetime | None
    needs_user_streak: int | None
    powens_connection_id: str | None

    @classmethod
    def failed(cls, connection: BankConnection, failure: Failure) -> ConnectionRecord:
        """A failed attempt: what Powens said before is kept; a 401 is held in SQL."""
        return cls(
            connection.id,
            False,
            failure.kind,
            pg_text(failure.reason[:MAX_REASON]),
            pg_text(failure.code),
            None,
            None,
            None,
            None,
            connection.fingerprint,
            None,
            None,
            connection.powens_id,
        )


# The pure core: every decision the job makes between reading and writing, as plain data.
# Nothing below reaches the database or the provider; the shell (_Refresh) fetches, plans,
# fences and applies.


@dataclass(frozen=True)
class Event:
    """A log line a decision asks for: its level, its constant name and its fields."""

    level: Literal["info", "warning"]
    name: str
    fields: dict[str, object]

    @classmethod
    def info(cls, name: str, /, **fields: object) -> Event:
        """An info line, written as the log call it stands for."""
        return cls("info", name, fields)

    @classmethod
    def warning(cls, name: str, /, **fields: object) -> Event:
        """A warning line, written as the log call it stands for."""
        return cls("warning", name, fields)


class AccountRow(NamedTuple):
    """One bank_accounts row to update, values in the columns' own types."""

    account_id: int
    balance: object
    last_sync: object
    currency: object
    type: str | None
    usage: str | None
    subtype: str | None


class TransactionRow(NamedTuple):
    """One transactions row to insert or update, values in the columns' own types."""

    account_id: int
    date: object
    amount: object
    label: str | None
    category: str | None
    tx_hash: str | None


class AccountState(NamedTuple):
    """One kontod_accounts row: what kontod remembers of an account Powens returned."""

    account_id: int
    connection_id: int
    powens_last_update: datetime | None
    deleted: bool
    disabled: bool
    transactions_last_update: datetime | None
    imported: bool
    null_balance: bool


@dataclass(frozen=True)
class ConnectionPlan:
    """One connection's part of its user's write, applied whole in a savepoint or not at all.

    With ``failure`` set (nothing fetched), only ``record`` is written. ``counts`` are added
    once the part and its user's transaction commit; ``events`` are logged as it is applied.
    """

    connection: BankConnection
    record: ConnectionRecord
    failure: Failure | None = None
    accounts: tuple[AccountRow, ...] = ()
    transactions: tuple[TransactionRow, ...] = ()
    deleted: tuple[tuple[int, str], ...] = ()
    states: tuple[AccountState, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Every decision of one user's refresh between fetching and writing.

    ``counts`` are counted at once, whatever becomes of the write; ``not_returned`` (accounts
    no connection returned) is counted and logged only when every part is written.
    """

    parts: tuple[ConnectionPlan, ...]
    counts: dict[str, int]
    not_returned: tuple[int, ...] = ()


@dataclass(frozen=True)
class Triage:
    """What is decided for a user before any call: the held connections, and whether to skip."""

    skip: bool
    counts: dict[str, int]
    events: tuple[Event, ...]


def connections_to_ask(
    active: list[BankConnection], known: set[int], unknown: bool
) -> tuple[list[BankConnection], list[BankConnection]]:
    """The user's connections to call and those held, from the active ones and the ids their
    stale accounts were last seen through (``unknown``: some stale account was never seen)."""
    # A stale account seen through a connection that is no longer active is as good as
    # unknown: every active connection is asked.
    everyone = unknown or not known <= {c.id for c in active}
    wanted = [c for c in active if everyone or c.id in known]
    return [c for c in wanted if not c.held], [c for c in wanted if c.held]


def triage(user: StaleUser) -> Triage:
    """Held connections are counted and logged; a user with nothing to call is skipped."""
    events = [
        Event.info(
            "refresh.connection_held", user_id=user.user_id, connection_id=c.id, until=c.held_until
        )
        for c in user.held
    ]
    counts = {"connections_held": len(user.held)}
    if user.to_call:
        return Triage(False, _nonzero(counts), tuple(events))
    counts["items_skipped"] = 1
    events.append(
        Event.info(
            "refresh.user_skipped",
            user_id=user.user_id,
            reason="connections_held" if user.held else "no_active_connection",
            stale_accounts=user.stale_accounts,
        )
    )
    return Triage(True, _nonzero(counts), tuple(events))


def transactions_wanted(
    local: list[LocalAccount], remote: list[ProviderAccount]
) -> list[tuple[str, datetime | None]]:
    """The Powens accounts whose transactions to fetch, each with the time to fetch from (None:
    from the start): live accounts some local account has never imported or saw change."""
    by_id = _by_provider_id(local)
    wanted = []
    for account in remote:
        if account.deleted or account.disabled:
            continue
        wanting = [a for a in by_id.get(account.id, []) if a.wants_transactions(account)]
        if wanting:
            wanted.append((account.id, _min_time(a.transactions_last_update for a in wanting)))
    return wanted


def plan(user: StaleUser, fetched: list[Fetched], now: datetime, schema: KontoSchema) -> Plan:
    """What to write for a user from what their connections brought at ``now``, and the counts."""
    local = _by_provider_id(user.accounts)
    parts = tuple(
        ConnectionPlan(f.connection, ConnectionRecord.failed(f.connection, f.failure), f.failure)
        if f.failure is not None
        else _plan_connection(user, f, local, now, schema)
        for f in fetched
    )
    failed = sum(1 for f in fetched if f.failure is not None)
    returned = {remote.id for f in fetched for remote in f.accounts}
    # Linked through a connection that is not active, or closed at the bank: worth seeing,
    # not a failure; unknowable when a connection brought nothing.
    not_returned = (
        () if failed else tuple(a.id for a in user.accounts if a.provider_id not in returned)
    )
    counts = {"connections_called": len(fetched), "connections_failed": failed}
    return Plan(parts, _nonzero(counts), not_returned)


def _plan_connection(
    user: StaleUser,
    f: Fetched,
    local: dict[str, list[LocalAccount]],
    now: datetime,
    schema: KontoSchema,
) -> ConnectionPlan:
    """One connection's accounts and transactions; an implausible amount is left out."""
    counts: Counter[str] = Counter()
    events: list[Event] = []
    updates: list[tuple[int, ProviderAccount, LocalAccount, object]] = []
    states: list[tuple[int, ProviderAccount, bool]] = []  # (local id, remote, imported)
    tx_rows: list[tuple[int, ProviderTransaction, object]] = []
    tx_gone: list[tuple[int, str]] = []
    for remote in f.accounts:
        for account in local.get(remote.id, []):
            txs = f.transactions.get(remote.id)
            if not (remote.deleted or remote.disabled):
                [balance] = schema.encode("bank_accounts", "balance", [remote.balance])
                if not plausible_amount(balance):
                    # Nothing of the account is written: it stays stale, asked again.
                    counts["accounts_invalid"] += 1
                    events.append(
                        Event.warning(
                            "refresh.account_invalid",
                            user_id=user.user_id,
                            connection_id=f.connection.id,
                            account_id=account.id,
                            provider_account_id=remote.id,
                            balance=str(remote.balance)[:40],
                        )
                    )
                    continue
                updates.append((account.id, remote, account, balance))
            states.append((account.id, remote, txs is not None))
            if remote.deleted or remote.disabled:
                continue
            for tx in txs or ():
                if tx.deleted:
                    tx_gone.append((account.id, pg_text(TX_HASH_PREFIX + tx.id) or ""))
                    continue
                if tx.coming:
                    counts["transactions_coming_skipped"] += 1
                    continue
                [amount] = schema.encode("transactions", "amount", [tx.amount])
                if not plausible_amount(amount):
                    counts["transactions_invalid"] += 1
                    events.append(
                        Event.warning(
                            "refresh.transaction_invalid",
                            user_id=user.user_id,
                            connection_id=f.connection.id,
                            account_id=account.id,
                            transaction_id=tx.id,
                            amount=str(tx.amount)[:40],
                        )
                    )
                    continue
                tx_rows.append((account.id, tx, amount))
    counts["balances_null_kept"] += sum(1 for _, r, _, _ in updates if r.balance is None)
    counts["accounts_deleted"] += sum(1 for _, r, _ in states if r.deleted)
    counts["accounts_disabled"] += sum(1 for _, r, _ in states if r.disabled and not r.deleted)
    record = _succeeded(f, now, counts)
    tx_last = {
        remote_id: _max_time(tx.last_update for tx in txs)
        for remote_id, txs in f.transactions.items()
    }
    return ConnectionPlan(
        f.connection,
        record,
        accounts=tuple(_account_row(schema, a, r, loc, b) for a, r, loc, b in updates),
        transactions=tuple(
            TransactionRow(
                account_id,
                _encode_one(schema, "transactions", "date", tx.date),
                amount,
                pg_text(tx.label),
                pg_text(tx.category),
                pg_text(TX_HASH_PREFIX + tx.id),
            )
            for account_id, tx, amount in tx_rows
        ),
        deleted=tuple(tx_gone),
        states=tuple(
            AccountState(
                account_id,
                f.connection.id,
                r.last_update,
                r.deleted,
                r.disabled,
                tx_last.get(r.id),
                imported,
                r.balance is None,
            )
            for account_id, r, imported in states
        ),
        counts=_nonzero(counts),
        events=tuple(events),
    )


def _account_row(
    schema: KontoSchema,
    account_id: int,
    remote: ProviderAccount,
    local: LocalAccount,
    balance: object,
) -> AccountRow:
    kind = classify(
        provider_type=remote.type,
        name=remote.name or local.name,
        usage=remote.usage,
        has_company=local.has_company,
    )
    return AccountRow(
        account_id,
        balance,
        _encode_one(schema, "bank_accounts", "last_sync", remote.last_update),
        _encode_one(schema, "bank_accounts", "currency", pg_text(remote.currency)),
        pg_text(kind.type),
        pg_text(kind.usage),
        pg_text(kind.subtype),
    )


def _succeeded(f: Fetched, now: datetime, counts: Counter[str]) -> ConnectionRecord:
    """The record of a connection that brought its data: a needs-user state holds it."""
    remote = f.remote
    state = pg_text(remote.state) if remote else None
    streak = f.connection.streak + 1 if state in NEEDS_USER else 0
    held_until = None
    if state in NEEDS_USER:
        counts["connections_needing_user"] += 1
        held_until = now + needs_user_hold(streak)
        if remote is not None and remote.next_try is not None:
            held_until = max(held_until, remote.next_try)
    return ConnectionRecord(
        f.connection.id,
        True,
        None,
        None,
        None,
        state,
        pg_text(remote.error_message) if remote else None,
        remote.last_update if remote else None,
        remote.next_try if remote else None,
        f.connection.fingerprint,
        held_until,
        streak,
        f.connection.powens_id,
    )


def _encode_one(schema: KontoSchema, table: str, column: str, value: object) -> object:
    [encoded] = schema.encode(table, column, [value])
    return encoded


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    """The counts that change: a zero adds nothing, the run's counts start at zero."""
    return {key: n for key, n in counts.items() if n}


@dataclass
class _Tally:
    refreshed: int = 0
    failed: int = 0
    done: int = 0
    first_failure: str | None = None


def make_body(
    pool: asyncpg.Pool,
    client: PowensClient,
    *,
    stale_after: timedelta,
    concurrency: int,
    key: bytes | None = None,
    schema: KontoSchema | None = None,
    token_hold: timedelta = TOKEN_HOLD,
    konto: KontoSql | None = None,
) -> JobBody:
    """The job body: refresh every user owning a stale account, ``concurrency`` at a time.

    ``key`` is the web app's token encryption key; ``token_hold`` the longest a 401 holds a
    connection. Konto's schema is read again at each run unless ``schema`` is given, so a
    change the web app makes to its tables is seen at the next run rather than at kontod's
    next start. ``konto``: Konto's tables are in that SQLite-family database, not in ``pool``
    (which keeps kontod's own); see ``kontod.jobs.refresh_lite``.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if konto is not None:
        if schema is not None:
            raise ValueError("schema describes Konto's tables in PostgreSQL; not with konto")
        # Imported here: refresh_lite builds on this module's shell (_Refresh).
        from kontod.jobs import refresh_lite

        return refresh_lite.make_body(
            pool,
            client,
            konto,
            stale_after=stale_after,
            concurrency=concurrency,
            key=key,
            token_hold=token_hold,
        )

    async def body(ctx: RunContext) -> None:
        current = schema
        if current is None:
            async with pool.acquire() as conn:
                current = await konto_schema.load(conn)
        job = _Refresh(pool, client, current, ctx, key, token_hold)
        await job.run(ctx.started_at - stale_after, concurrency)

    return body


class _Refresh:
    """One run of the job."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: PowensClient,
        schema: KontoSchema,
        ctx: RunContext,
        key: bytes | None,
        token_hold: timedelta,
    ) -> None:
        self.pool = pool
        self.client = client
        self.schema = schema
        self.sql = statements(schema)
        self.ctx = ctx
        self.key = key
        self.key_fingerprint = tokens.key_fingerprint(key)
        self.token_hold = token_hold
        self.now = ctx.started_at
        self.tally = _Tally()

    async def run(self, cutoff: datetime, concurrency: int) -> None:
        ctx = self.ctx
        if self.key is not None:
            # As at start, for runs outside the daemon (`kontod jobs run`) and for a key the
            # web app changed since: a key that opens no stored token fails the run, loudly.
            await self.check_key(self.key)
        users = await self.stale_users(cutoff)
        # Zeros are written too, so a run's stored counts always show every outcome.
        ctx.counts.update(dict.fromkeys(COUNT_KEYS, 0))
        ctx.counts["users"] = len(users)
        ctx.counts["stale_accounts"] = sum(u.stale_accounts for u in users)
        ctx.report_progress(0, len(users))
        ctx.log.info(
            "refresh.started",
            users=len(users),
            stale_accounts=ctx.counts["stale_accounts"],
            cutoff=cutoff.isoformat(),
            concurrency=concurrency,
        )
        queue = iter(users)

        async def worker() -> None:
            # Workers share one iterator: each user is taken once, and at most ``concurrency``
            # users are in flight, with as many tasks whatever the number of users.
            for user in queue:
                await self.refresh_user_isolated(user)
                self.tally.done += 1
                ctx.report_progress(self.tally.done, len(users))

        await run_workers(worker, min(concurrency, len(users)), "refresh")

        await self.count_after(cutoff)
        ctx.log.info(
            "refresh.finished",
            refreshed=self.tally.refreshed,
            failed=self.tally.failed,
            skipped=ctx.counts["items_skipped"],
            accounts_updated=ctx.counts["accounts_updated"],
            transactions_inserted=ctx.counts["transactions_inserted"],
            stale_accounts_after=ctx.counts["stale_accounts_after"],
        )
        if self.tally.failed and not self.tally.refreshed:
            raise RefreshFailed(
                f"all {self.tally.failed} users with a connection to ask failed to refresh;"
                f" first failure: {self.tally.first_failure}"
            )

    async def check_key(self, key: bytes) -> None:
        """``tokens.check_key`` on the stored tokens: ``WrongKey`` when the key opens none."""
        async with self.pool.acquire() as conn:
            await tokens.check_key(conn, key)

    async def stale_users(self, cutoff: datetime) -> list[StaleUser]:
        """Every user owning a stale account, with the connections to ask (three statements)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self.sql.stale_users, cutoff)
            ids = [r["user_id"] for r in rows]
            connections = await conn.fetch(
                self.sql.connections, ids, self.now, self.key_fingerprint, self.token_hold
            )
            accounts = await conn.fetch(self.sql.accounts, ids)
        by_user_conn: defaultdict[int, list[BankConnection]] = defaultdict(list)
        for r in connections:
            by_user_conn[r["user_id"]].append(
                BankConnection(
                    id=r["id"],
                    powens_id=r["powens_id"],
                    stored=r["stored"],
                    fingerprint=r["fingerprint"],
                    held=r["held"],
                    held_until=r["held_until"],
                    streak=r["streak"],
                )
            )
        by_user_acc: defaultdict[int, list[LocalAccount]] = defaultdict(list)
        for r in accounts:
            by_user_acc[r["user_id"]].append(
                LocalAccount(
                    id=r["id"],
                    provider_id=r["provider_id"],
                    name=r["name"],
                    has_company=r["company"],
                    powens_last_update=r["powens_last_update"],
                    transactions_last_update=r["transactions_last_update"],
                    transactions_imported=r["transactions_imported_at"] is not None,
                )
            )
        users = []
        for r in rows:
            to_call, held = connections_to_ask(
                by_user_conn[r["user_id"]], set(r["known"] or ()), r["unknown"]
            )
            users.append(
                StaleUser(
                    user_id=r["user_id"],
                    stale_accounts=r["stale"],
                    accounts=by_user_acc[r["user_id"]],
                    to_call=to_call,
                    held=held,
                )
            )
        return users

    async def refresh_user_isolated(self, user: StaleUser) -> None:
        """``refresh_user``, where anything but a lost claim or a cancellation fails the user only."""
        try:
            await self.refresh_user(user)
        except ClaimLost:
            raise
        except Exception as exc:
            # A bug or an error no narrower handler knew: still this user's failure alone.
            failure = failure_of(exc)
            self.ctx.log.exception(
                "refresh.user_failed", user_id=user.user_id, kind=failure.kind, error=failure.reason
            )
            await self._record_failures(
                user, [ConnectionRecord.failed(c, failure) for c in user.to_call]
            )
            self._count_user(user, failure=failure.reason)

    async def refresh_user(self, user: StaleUser) -> None:
        """Fetch every connection of the user, plan, then apply the plan in one transaction."""
        ctx = self.ctx
        before = triage(user)
        ctx.counts.update(before.counts)
        self._emit(before.events)
        if before.skip:
            return
        fetched = [await self.fetch(user, c) for c in user.to_call]
        planned = plan(user, fetched, self.now, self.schema)
        ctx.counts.update(planned.counts)
        # Each part's failure: the fetch's, or its write's once applied.
        failures = [part.failure for part in planned.parts]
        try:
            written = await self.write_user(user, planned, failures)
        except ClaimLost:
            raise
        except Exception as exc:
            # The whole transaction is gone (the connection to the database, a failed commit):
            # nothing of the user was written, every connection is recorded with the failure.
            failure = failure_of(exc)
            ctx.log.warning(
                "refresh.user_write_failed",
                user_id=user.user_id,
                kind=failure.kind,
                error=failure.reason,
                exc_info=failure.kind == "internal",
            )
            ctx.counts["connections_failed"] += sum(1 for p in planned.parts if p.failure is None)
            await self._record_failures(
                user,
                [
                    ConnectionRecord.failed(part.connection, own or failure)
                    for part, own in zip(planned.parts, failures, strict=True)
                ],
            )
            self._count_user(user, failure=failure.reason)
            return
        # Counted once committed: a rolled back write counts nothing.
        ctx.counts.update(written)
        first = next((f for f in failures if f is not None), None)
        self._count_user(user, failure=first.reason if first else None)

    async def write_user(
        self, user: StaleUser, planned: Plan, failures: list[Failure | None]
    ) -> Counter[str]:
        """The user's plan in one transaction under the run's claim; the counts to add once it
        commits. A connection whose part fails is set in ``failures``; anything raised means
        nothing of the user was written."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.ctx.check_claim(conn)
            return await self.apply(conn, user, planned, failures)

    async def _record_failures(self, user: StaleUser, records: list[ConnectionRecord]) -> None:
        """Record failed connections in a transaction of their own; a failure here is logged."""
        if not records:
            return
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self.ctx.check_claim(conn)
                await self.record(conn, records)
        except ClaimLost:
            raise
        except Exception as exc:
            self.ctx.log.error(
                "refresh.record_failed",
                user_id=user.user_id,
                connection_ids=[r.connection_id for r in records],
                error=failure_of(exc).reason,
            )

    def _count_user(self, user: StaleUser, failure: str | None) -> None:
        if failure is None:
            self.tally.refreshed += 1
            self.ctx.counts["items_refreshed"] += 1
            return
        self.tally.failed += 1
        self.tally.first_failure = self.tally.first_failure or failure[:MAX_REASON]
        self.ctx.counts["items_failed"] += 1

    def _emit(self, events: Iterable[Event]) -> None:
        log = self.ctx.log
        for event in events:
            if event.level == "warning":
                log.warning(event.name, **event.fields)
            else:
                log.info(event.name, **event.fields)

    async def fetch(self, user: StaleUser, connection: BankConnection) -> Fetched:
        """Everything one connection gives; any failure of it is returned, not raised."""
        out = Fetched(connection)
        token = ""
        try:
            token = tokens.decrypt(connection.stored, self.key)
            tokens.header_safe(token)
            remote = await self.client.connections(token)
            out.remote = _pick(remote, connection.powens_id)
            out.accounts = await self.client.accounts(token)
            for account_id, since in transactions_wanted(user.accounts, out.accounts):
                out.transactions[account_id] = await self.client.transactions(
                    token, account_id, since=since
                )
        except ClaimLost:
            raise
        except Exception as exc:
            # A connection brings all or nothing: balances without their transactions would
            # look fresh and never be asked for the missing transactions.
            out.failure = failure_of(exc, token, connection.stored)
            out.remote, out.accounts, out.transactions = None, [], {}
            self.ctx.log.warning(
                "refresh.connection_failed",
                user_id=user.user_id,
                connection_id=connection.id,
                kind=out.failure.kind,
                endpoint=getattr(exc, "endpoint", None),
                status=getattr(exc, "status", None),
                code=getattr(exc, "code", None),
                request_id=getattr(exc, "request_id", None),
                reason=out.failure.reason,
                # A traceback for what kontod did not foresee, unless its text quotes the token.
                exc_info=out.failure.kind == "internal" and not _quotes(exc, token),
            )
        return out

    async def apply(
        self, conn: Connection, user: StaleUser, planned: Plan, failures: list[Failure | None]
    ) -> Counter[str]:
        """The user's plan, inside the user's transaction: each connection's part in a savepoint,
        so that a write the database refuses fails that connection alone (set in ``failures``).
        Returns the counts to add once the transaction commits."""
        counts: Counter[str] = Counter()
        for i, part in enumerate(planned.parts):
            record = part.record
            if part.failure is None:
                try:
                    async with conn.transaction():
                        written = await self._apply_part(conn, part)
                except ClaimLost:
                    raise
                except Exception as exc:
                    failures[i] = failure = failure_of(exc)
                    counts["connections_failed"] += 1
                    self.ctx.log.warning(
                        "refresh.connection_write_failed",
                        user_id=user.user_id,
                        connection_id=part.connection.id,
                        kind=failure.kind,
                        error=failure.reason,
                        exc_info=failure.kind == "internal",
                    )
                    record = ConnectionRecord.failed(part.connection, failure)
                else:
                    counts.update(written)
                    continue
            try:
                async with conn.transaction():
                    await self.record(conn, [record])
            except ClaimLost:
                raise
            except asyncpg.PostgresError as exc:
                # Provider text is made fit for the column; should the row still be refused,
                # the failure stays logged and counted, and the user's other data stays.
                self.ctx.log.error(
                    "refresh.record_failed",
                    user_id=user.user_id,
                    connection_ids=[part.connection.id],
                    error=failure_of(exc).reason,
                )
        if planned.not_returned and all(f is None for f in failures):
            counts["accounts_not_returned"] += len(planned.not_returned)
            self.ctx.log.info(
                "refresh.accounts_not_returned",
                user_id=user.user_id,
                account_ids=list(planned.not_returned),
            )
        return counts

    async def _apply_part(self, conn: Connection, part: ConnectionPlan) -> Counter[str]:
        """One connection's writes and its record; the counts the database's answers add."""
        self._emit(part.events)
        counts: Counter[str] = Counter(part.counts)
        if part.accounts:
            status = await conn.execute(self.sql.update_accounts, *_columns(part.accounts))
            counts["accounts_updated"] += int(status.split()[-1])
        if part.transactions:
            row = await conn.fetchrow(self.sql.upsert_transactions, *_columns(part.transactions))
            assert row is not None
            counts["transactions_inserted"] += row["inserted"]
            counts["transactions_updated"] += row["updated"]
        if part.deleted:
            status = await conn.execute(self.sql.delete_transactions, *_columns(part.deleted))
            counts["transactions_deleted"] += int(status.split()[-1])
        if part.states:
            await conn.execute(self.sql.upsert_kontod_accounts, *_columns(part.states), self.now)
        await self.record(conn, [part.record])
        return counts

    async def record(self, conn: Connection, records: list[ConnectionRecord]) -> None:
        """Upsert one kontod_connections row per connection tried."""
        if not records:
            return
        await conn.execute(
            self.sql.record_connections,
            *_columns(records),
            self.now,
            self.key_fingerprint,
            self.token_hold,
        )

    async def count_after(self, cutoff: datetime) -> None:
        """Stale accounts by reason and active connections by state, into the run's counts."""
        async with self.pool.acquire() as conn:
            reasons = await conn.fetch(self.sql.stale_reasons, cutoff, sorted(NEEDS_USER))
            states = await conn.fetch(self.sql.connection_states)
        counts = self.ctx.counts
        for reason in STALE_REASONS:
            self.ctx.set_in(STALE, reason, 0)
        for r in reasons:
            self.ctx.set_in(STALE, r["reason"], r["accounts"])
        counts["stale_accounts_after"] = sum(r["accounts"] for r in reasons)
        self.ctx.set_in(CONNECTIONS, "ok", 0)  # present even with no connection: the metric exists
        for r in states:
            self.ctx.set_in(CONNECTIONS, r["state"], r["connections"])


def _pick(remote: list[ProviderConnection], powens_id: str | None) -> ProviderConnection | None:
    """The Powens connection a bank_connections row stands for (by id, else the only one)."""
    for c in remote:
        if powens_id is not None and c.id == powens_id:
            return c
    if len(remote) == 1:
        return remote[0]
    # Several and none matching: the most troubled one speaks for the token.
    return next((c for c in remote if c.state), remote[0] if remote else None)


def _columns(rows: Iterable[tuple[object, ...]]) -> list[list[object]]:
    """Rows turned into the parameter arrays of an unnest statement, one list per column."""
    return [list(column) for column in zip(*rows, strict=True)]


def _by_provider_id(accounts: list[LocalAccount]) -> dict[str, list[LocalAccount]]:
    out: defaultdict[str, list[LocalAccount]] = defaultdict(list)
    for a in accounts:
        if a.provider_id is not None:
            out[a.provider_id].append(a)
    return out


def _min_time(values: Iterable[datetime | None]) -> datetime | None:
    """The earliest time, or None when any is None (an import from the start is needed)."""
    items = list(values)
    if not items or any(v is None for v in items):
        return None
    return min(v for v in items if v is not None)


def _max_time(values: Iterable[datetime | None]) -> datetime | None:
    items = [v for v in values if v is not None]
    return max(items) if items else None


def _quotes(exc: BaseException, token: str) -> bool:
    """Whether an exception's text, or that of its causes, holds the token."""
    if not token:
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if token in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
