"""The refresh job's decisions as tables: what it plans to write and count, no database, no bank."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from kontod.jobs.refresh import (
    AccountRow,
    AccountState,
    BankConnection,
    ConnectionRecord,
    Failure,
    Fetched,
    LocalAccount,
    StaleUser,
    TransactionRow,
    connections_to_ask,
    plan,
    statements,
    transactions_wanted,
    triage,
    tx_key,
)
from kontod.konto.schema import REQUIRED, KontoSchema
from kontod.providers.powens import ProviderAccount, ProviderConnection, ProviderTransaction

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SYNCED = NOW - timedelta(hours=2)
BEFORE = NOW - timedelta(days=10)
DAY = date(2026, 2, 27)


def konto_schema(money: str, time: str, day: str) -> KontoSchema:
    """Every column kontod uses, as text unless named here."""
    casts = {(table, column): "text" for table, columns in REQUIRED.items() for column in columns}
    casts.update(
        {
            ("bank_accounts", "balance"): money,
            ("transactions", "amount"): money,
            ("bank_accounts", "last_sync"): time,
            ("transactions", "date"): day,
        }
    )
    return KontoSchema(casts)


# kontod's own test tables (exact money, real times) and the web app's (float money, text times).
EXACT = konto_schema("numeric", "timestamptz", "date")
WEB_APP = konto_schema("double precision", "text", "text")


def bank(conn_id: int = 1, *, held: bool = False, streak: int = 0) -> BankConnection:
    return BankConnection(
        id=conn_id,
        powens_id=str(conn_id),
        stored=f"token-{conn_id}",
        fingerprint=f"fp-{conn_id}",
        held=held,
        held_until="2026-03-02 12:00:00+00" if held else None,
        streak=streak,
    )


def local(
    account_id: int,
    provider_id: str | None,
    *,
    imported: bool = True,
    seen: datetime | None = BEFORE,
    tx_seen: datetime | None = BEFORE,
) -> LocalAccount:
    return LocalAccount(
        id=account_id,
        provider_id=provider_id,
        name=None,
        has_company=False,
        powens_last_update=seen,
        transactions_last_update=tx_seen,
        transactions_imported=imported,
    )


def remote(
    provider_id: str,
    balance: str | None = "100.00",
    *,
    deleted: bool = False,
    disabled: bool = False,
    last_update: datetime | None = SYNCED,
    type_: str | None = "checking",
) -> ProviderAccount:
    return ProviderAccount(
        id=provider_id,
        name="Compte",
        type=type_,
        usage="PRIV",
        balance=None if balance is None else Decimal(balance),
        connection_id="1",
        currency="EUR",
        last_update=last_update,
        deleted=deleted,
        disabled=disabled,
    )


def tx(
    tx_id: str,
    amount: str | None = "-12.50",
    *,
    coming: bool = False,
    deleted: bool = False,
    label: str = "CB CAFE",
    last_update: datetime | None = SYNCED,
    day: date | None = DAY,
) -> ProviderTransaction:
    return ProviderTransaction(
        id=tx_id,
        date=day,
        amount=None if amount is None else Decimal(amount),
        label=label,
        category="food",
        coming=coming,
        deleted=deleted,
        last_update=last_update,
    )


def user(
    accounts: list[LocalAccount],
    to_call: list[BankConnection] | None = None,
    held: list[BankConnection] | None = None,
) -> StaleUser:
    return StaleUser(
        user_id=7,
        stale_accounts=len(accounts),
        accounts=accounts,
        to_call=[bank()] if to_call is None else to_call,
        held=held or [],
    )


def brought(
    accounts: list[ProviderAccount],
    transactions: dict[str, list[ProviderTransaction]] | None = None,
    *,
    connection: BankConnection | None = None,
    state: str | None = None,
    next_try: datetime | None = None,
) -> Fetched:
    return Fetched(
        connection or bank(),
        remote=ProviderConnection("1", state, "error text" if state else None, SYNCED, next_try),
        accounts=accounts,
        transactions=transactions or {},
    )


# connections_to_ask: (active connections as (id, held), known ids, some stale account never
# seen) -> (ids to call, ids held).
@pytest.mark.parametrize(
    ("active", "known", "unknown", "to_call", "held"),
    [
        ([(1, False), (2, False)], set(), True, [1, 2], []),
        ([(1, False), (2, True)], set(), True, [1], [2]),
        # Every stale account was seen through connection 2: only it is asked.
        ([(1, False), (2, False)], {2}, False, [2], []),
        ([(1, False), (2, True)], {2}, False, [], [2]),
        # Seen through connection 3, no longer active: as good as unknown.
        ([(1, False), (2, False)], {2, 3}, False, [1, 2], []),
        ([], {3}, False, [], []),
        ([], set(), True, [], []),
    ],
)
def test_which_connections_are_asked(
    active: list[tuple[int, bool]],
    known: set[int],
    unknown: bool,
    to_call: list[int],
    held: list[int],
) -> None:
    calls, holds = connections_to_ask([bank(i, held=h) for i, h in active], known, unknown)
    assert ([c.id for c in calls], [c.id for c in holds]) == (to_call, held)


# triage: (connections to call, held) -> (skipped, counts, events with the skip's reason).
@pytest.mark.parametrize(
    ("to_call", "held", "skip", "counts", "events"),
    [
        (1, 0, False, {}, []),
        (1, 2, False, {"connections_held": 2}, ["connection_held", "connection_held"]),
        (0, 1, True, {"connections_held": 1, "items_skipped": 1}, ["connection_held", "held"]),
        (0, 0, True, {"items_skipped": 1}, ["no_active"]),
    ],
)
def test_held_connections_and_skipped_users(
    to_call: int, held: int, skip: bool, counts: dict[str, int], events: list[str]
) -> None:
    decided = triage(
        user(
            [local(1, "1")],
            to_call=[bank(i) for i in range(1, to_call + 1)],
            held=[bank(10 + i, held=True) for i in range(held)],
        )
    )
    named = [
        {"connections_held": "held", "no_active_connection": "no_active"}[str(e.fields["reason"])]
        if e.name == "refresh.user_skipped"
        else e.name.removeprefix("refresh.")
        for e in decided.events
    ]
    assert (decided.skip, decided.counts, named) == (skip, counts, events)


# transactions_wanted: (local accounts, Powens accounts) -> (Powens id, fetched since).
@pytest.mark.parametrize(
    ("locals_", "remotes", "wanted"),
    [
        # Never imported: everything from the start.
        ([local(1, "a", imported=False, tx_seen=None)], [remote("a")], [("a", None)]),
        # Bank data moved since the last import: from the newest transaction seen.
        ([local(1, "a")], [remote("a")], [("a", BEFORE)]),
        # Unchanged since the last import: nothing to ask.
        ([local(1, "a", seen=SYNCED)], [remote("a")], []),
        ([local(1, "a", seen=NOW)], [remote("a", last_update=SYNCED)], []),
        # Powens gave no time, or kontod never saw one: asked, to be sure.
        ([local(1, "a", seen=SYNCED)], [remote("a", last_update=None)], [("a", BEFORE)]),
        ([local(1, "a", seen=None)], [remote("a")], [("a", BEFORE)]),
        # Deleted, disabled, or nobody's account: never asked.
        ([local(1, "a")], [remote("a", deleted=True), remote("b", disabled=True)], []),
        ([local(1, "a")], [remote("z")], []),
        # Two local accounts on one Powens id: from the earlier time; None wins.
        (
            [local(1, "a", tx_seen=BEFORE), local(2, "a", tx_seen=SYNCED)],
            [remote("a")],
            [("a", BEFORE)],
        ),
        (
            [local(1, "a", tx_seen=None), local(2, "a", tx_seen=SYNCED)],
            [remote("a")],
            [("a", None)],
        ),
        # One wanting and one up to date: only the wanting one's time counts.
        (
            [local(1, "a", seen=NOW, tx_seen=BEFORE), local(2, "a", tx_seen=SYNCED)],
            [remote("a")],
            [("a", SYNCED)],
        ),
    ],
)
def test_which_transactions_are_fetched(
    locals_: list[LocalAccount],
    remotes: list[ProviderAccount],
    wanted: list[tuple[str, datetime | None]],
) -> None:
    assert transactions_wanted(locals_, remotes) == wanted


# One Powens account for one local account: (its balance, deleted, disabled, schema) ->
# (updated, kontod_accounts row written, counts, events).
@pytest.mark.parametrize(
    ("balance", "deleted", "disabled", "schema", "updated", "state", "counts", "events"),
    [
        ("100.00", False, False, EXACT, True, True, {}, []),
        (None, False, False, EXACT, True, True, {"balances_null_kept": 1}, []),
        # 10^15 is the largest plausible amount, either sign.
        ("1E+15", False, False, EXACT, True, True, {}, []),
        ("-1E+15", False, False, WEB_APP, True, True, {}, []),
        ("1000000000000000.01", False, False, EXACT, False, False, {"accounts_invalid": 1}, [1]),
        ("1e16", False, False, EXACT, False, False, {"accounts_invalid": 1}, [1]),
        # A finite decimal that a float column would take as Infinity.
        ("1e400", False, False, WEB_APP, False, False, {"accounts_invalid": 1}, [1]),
        ("1e400", False, False, EXACT, False, False, {"accounts_invalid": 1}, [1]),
        # Deleted or disabled: remembered, balance left alone, however absurd.
        ("1e400", True, False, EXACT, False, True, {"accounts_deleted": 1}, []),
        ("5", False, True, EXACT, False, True, {"accounts_disabled": 1}, []),
        ("5", True, True, EXACT, False, True, {"accounts_deleted": 1}, []),
    ],
)
def test_an_account_is_updated_refused_or_only_remembered(
    balance: str | None,
    deleted: bool,
    disabled: bool,
    schema: KontoSchema,
    updated: bool,
    state: bool,
    counts: dict[str, int],
    events: list[int],
) -> None:
    account = remote("a", balance, deleted=deleted, disabled=disabled)
    planned = plan(user([local(1, "a")]), [brought([account])], NOW, schema)
    [part] = planned.parts
    assert [row.account_id for row in part.accounts] == ([1] if updated else [])
    assert [row.account_id for row in part.states] == ([1] if state else [])
    assert part.counts == counts
    assert [e.fields["account_id"] for e in part.events] == events
    assert {e.name for e in part.events} <= {"refresh.account_invalid"}
    assert planned.counts == {"connections_called": 1}


# One transaction of a live account: (the transaction) -> (written, deleted, counts, events).
@pytest.mark.parametrize(
    ("transaction", "written", "gone", "counts", "events"),
    [
        (tx("t1"), ["powens_t1"], [], {}, []),
        # Konto's date and amount are NOT NULL: left out, counted.
        (tx("t1", None), [], [], {"transactions_incomplete_skipped": 1}, []),
        (tx("t1", day=None), [], [], {"transactions_incomplete_skipped": 1}, []),
        (tx("t1", coming=True), [], [], {"transactions_coming_skipped": 1}, []),
        (tx("t1", deleted=True), [], ["powens_t1"], {}, []),
        # Deleted wins over coming: the row, if any, goes.
        (tx("t1", coming=True, deleted=True), [], ["powens_t1"], {}, []),
        (tx("t1", "-2e15"), [], [], {"transactions_invalid": 1}, ["t1"]),
        (tx("t1", "1e400"), [], [], {"transactions_invalid": 1}, ["t1"]),
        (tx("t1", "-1E+15"), ["powens_t1"], [], {}, []),
        # Text PostgreSQL would refuse is made fit for it, the key included.
        (tx("t\x001"), ["powens_t\ufffd1"], [], {}, []),
    ],
)
def test_a_transaction_is_written_deleted_skipped_or_refused(
    transaction: ProviderTransaction,
    written: list[str],
    gone: list[str],
    counts: dict[str, int],
    events: list[str],
) -> None:
    fetched = brought([remote("a")], {"a": [transaction]})
    [part] = plan(user([local(1, "a")]), [fetched], NOW, EXACT).parts
    assert [row.tx_hash for row in part.transactions] == written
    assert list(part.deleted) == [(1, h) for h in gone]
    assert part.counts == counts
    assert [e.fields["transaction_id"] for e in part.events] == events


def test_a_deleted_or_disabled_accounts_transactions_are_left_alone() -> None:
    fetched = brought(
        [remote("a", deleted=True), remote("b", disabled=True)],
        {"a": [tx("t1")], "b": [tx("t2", deleted=True)]},
    )
    [part] = plan(user([local(1, "a"), local(2, "b")]), [fetched], NOW, EXACT).parts
    assert (part.transactions, part.deleted) == ((), ())
    assert part.counts == {"accounts_deleted": 1, "accounts_disabled": 1}


# The rows of one connection's part, in the column types of each schema; last_sync is the
# time of the fetch (NOW), as the web app writes it, the bank's own time (SYNCED) kontod's.
@pytest.mark.parametrize(
    ("schema", "balance", "last_sync", "tx_date", "amount"),
    [
        (EXACT, Decimal("100.00"), NOW, DAY, Decimal("-12.50")),
        (WEB_APP, 100.0, "2026-03-01T12:00:00.000Z", "2026-02-27", -12.5),
    ],
)
def test_the_rows_written_are_in_the_columns_types(
    schema: KontoSchema, balance: object, last_sync: object, tx_date: object, amount: object
) -> None:
    transactions = {"a": [tx("t1", last_update=BEFORE), tx("t0", deleted=True)]}
    fetched = brought([remote("a"), remote("b")], transactions)
    accounts = [local(1, "a"), local(2, "b")]
    [part] = plan(user(accounts), [fetched], NOW, schema).parts
    assert part.accounts == (
        AccountRow(1, balance, last_sync, "EUR", "checking", "personal", None),
        AccountRow(2, balance, last_sync, "EUR", "checking", "personal", None),
    )
    assert part.transactions == (
        TransactionRow(1, tx_date, amount, "CB CAFE", "food", "powens_t1"),
    )
    assert part.deleted == ((1, "powens_t0"),)
    # An account whose transactions were asked is marked imported, with the newest time seen
    # among them (a deleted one's included); one not asked keeps what kontod had.
    assert part.states == (
        AccountState(1, 1, SYNCED, False, False, SYNCED, True, False),
        AccountState(2, 1, SYNCED, False, False, None, False, False),
    )


# The connection's record after a successful call: (Powens state, streak so far, Powens'
# next_try) -> (streak stored, held until, needing-user count).
@pytest.mark.parametrize(
    ("state", "streak", "next_try", "stored_streak", "held_until", "needing"),
    [
        (None, 0, None, 0, None, 0),
        # A success ends a streak.
        (None, 5, None, 0, None, 0),
        # A state that is not the user's to solve holds nothing.
        ("bug", 3, None, 0, None, 0),
        ("SCARequired", 0, None, 1, NOW + timedelta(days=1), 1),
        ("wrongpass", 1, None, 2, NOW + timedelta(days=2), 1),
        ("actionNeeded", 2, None, 3, NOW + timedelta(days=4), 1),
        ("passwordExpired", 3, None, 4, NOW + timedelta(days=7), 1),
        ("decoupled", 40, None, 41, NOW + timedelta(days=7), 1),
        # Powens' own next try, when later, holds longer.
        ("SCARequired", 0, NOW + timedelta(days=3), 1, NOW + timedelta(days=3), 1),
        ("SCARequired", 0, NOW + timedelta(hours=1), 1, NOW + timedelta(days=1), 1),
    ],
)
def test_a_connection_needing_the_user_is_held_longer_each_time(
    state: str | None,
    streak: int,
    next_try: datetime | None,
    stored_streak: int,
    held_until: datetime | None,
    needing: int,
) -> None:
    connection = bank(streak=streak)
    fetched = brought([remote("a")], connection=connection, state=state, next_try=next_try)
    [part] = plan(user([local(1, "a")], to_call=[connection]), [fetched], NOW, EXACT).parts
    record = part.record
    assert (record.ok, record.error_kind, record.powens_state) == (True, None, state)
    assert (record.needs_user_streak, record.held_until) == (stored_streak, held_until)
    assert part.counts.get("connections_needing_user", 0) == needing
    assert (record.token_fingerprint, record.powens_connection_id) == ("fp-1", "1")


FAILED = Failure("unavailable", "connection failed after 4 attempts", "E1")


# A user's plan: (what each connection brought, None for a failure) -> (counts at once,
# accounts not returned, part failed).
@pytest.mark.parametrize(
    ("brings", "counts", "not_returned", "failed"),
    [
        ([["a", "b"]], {"connections_called": 1}, (), [False]),
        # Account 2 ("b") is nowhere: worth seeing, counted when every part is written.
        ([["a"]], {"connections_called": 1}, (2,), [False]),
        ([["a"], ["b"]], {"connections_called": 2}, (), [False, False]),
        # A connection brought nothing: whether an account is missing is unknowable.
        ([["a"], None], {"connections_called": 2, "connections_failed": 1}, (), [False, True]),
        ([None], {"connections_called": 1, "connections_failed": 1}, (), [True]),
    ],
)
def test_a_users_plan_counts_calls_failures_and_accounts_not_returned(
    brings: list[list[str] | None],
    counts: dict[str, int],
    not_returned: tuple[int, ...],
    failed: list[bool],
) -> None:
    connections = [bank(i + 1) for i in range(len(brings))]
    fetched = [
        Fetched(c, FAILED)
        if ids is None
        else brought([remote(i) for i in ids], connection=c, state=None)
        for c, ids in zip(connections, brings, strict=True)
    ]
    who = user([local(1, "a"), local(2, "b")], to_call=connections)
    planned = plan(who, fetched, NOW, EXACT)
    assert planned.counts == counts
    assert planned.not_returned == not_returned
    assert [p.failure is not None for p in planned.parts] == failed
    for part, connection in zip(planned.parts, connections, strict=True):
        if part.failure is not None:
            # Only the failure is recorded: nothing of the connection is written.
            assert part.record == ConnectionRecord.failed(connection, FAILED)
            assert (part.accounts, part.states, part.counts, part.events) == ((), (), {}, ())
            assert (part.record.ok, part.record.error_kind, part.record.error_code) == (
                False,
                "unavailable",
                "E1",
            )


def test_every_statement_is_an_attribute_with_the_columns_casts() -> None:
    exact, web_app = statements(EXACT), statements(WEB_APP)
    assert "$2::double precision[]" in web_app.update_accounts
    assert "$2::numeric[]" in exact.update_accounts
    assert "kontod_try_timestamptz(a.last_sync)" in web_app.stale_users
    assert "kontod_try_timestamptz" not in exact.stale_users


def test_a_transaction_without_an_id_gets_the_web_apps_fallback_key() -> None:
    nameless = ProviderTransaction(
        id=None,
        date=DAY,
        amount=Decimal("-12.50"),
        label=" CB CAFE ",
        category=None,
        date_text="2026-02-10",
        value_text="-12.5",
    )
    digest = hashlib.sha256(b"7|2026-02-10|-12.5|CB CAFE").hexdigest()
    assert tx_key(7, nameless) == "powens_f_" + digest[:20]
    assert tx_key(7, tx("t9")) == "powens_t9"
    # Two alike have one key, written once (one upsert cannot write a row twice).
    fetched = brought([remote("a")], {"a": [nameless, nameless]})
    [part] = plan(user([local(7, "a")]), [fetched], NOW, EXACT).parts
    assert [row.tx_hash for row in part.transactions] == ["powens_f_" + digest[:20]]
