"""The Powens client against the sandbox bank over loopback HTTP: parsing, retries, failures."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import aiohttp
import asyncpg
import pytest
import structlog

from kontod.demo.sandbox import (
    Fault,
    PowensUser,
    Raw,
    Sandbox,
    SandboxTransaction,
    deep_json,
    demo_accounts,
    demo_transactions,
    token_for,
)
from kontod.jobs.refresh import make_body
from kontod.providers.powens import (
    ProviderAuthError,
    ProviderBadResponse,
    ProviderError,
    ProviderSetupError,
    ProviderUnavailable,
    RateLimiter,
    backoff_seconds,
    retry_after_seconds,
)
from kontod.scheduler.contract import RunContext
from tests.sandbox_helpers import Bank, fast_client, seed_user

TOKEN = token_for(1)


class Calls:
    """An observer that remembers what the client reported."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    def __call__(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.seen.append((endpoint, outcome, seconds))

    @property
    def outcomes(self) -> list[str]:
        return [outcome for _, outcome, _ in self.seen]


async def test_accounts_and_transactions_are_parsed_with_exact_decimals(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    calls = Calls()
    client = fast_client(http, bank.url, observe=calls)

    accounts = await client.accounts(TOKEN)

    expected = demo_accounts(1)
    assert [a.id for a in accounts] == [str(a.id) for a in expected]
    assert [a.balance for a in accounts] == [a.balance for a in expected]
    assert all(isinstance(a.balance, Decimal) for a in accounts)
    assert accounts[1].type == "ldds"
    assert accounts[4].usage == "ORGA"
    assert accounts[0].name == "Compte chèques"
    assert accounts[0].connection_id == "1"
    assert accounts[0].currency == "EUR"
    assert accounts[0].last_update == bank.sandbox.synced_at
    assert not accounts[0].deleted and not accounts[0].disabled

    # Pages of two: the second page comes through _links.next, followed as given.
    txs = await client.transactions(TOKEN, accounts[0].id, limit=2)
    demo = sorted(demo_transactions(expected[0].id), key=lambda t: (t.date, t.id), reverse=True)
    assert [t.id for t in txs] == [str(t.id) for t in demo]
    assert [t.amount for t in txs] == [t.value for t in demo]
    assert [t.date for t in txs] == [t.date for t in demo]
    assert [t.label for t in txs] == [t.wording for t in demo]
    # The web app's category.name; Powens sends none (its categories need expand=categories).
    assert [t.category for t in txs] == [None] * len(demo)
    assert all(t.last_update == bank.sandbox.synced_at and not t.coming for t in txs)
    assert calls.outcomes == ["200", "200", "200"]
    assert [endpoint for endpoint, _, _ in calls.seen] == [
        "accounts",
        "transactions",
        "transactions",
    ]
    [(_, first), (_, second)] = bank.sandbox.queries[1:]
    assert first == {"limit": "2", "all": "true"}
    assert second == {**first, "offset": "2"}
    assert all(seconds >= 0 for _, _, seconds in calls.seen)


async def test_connections_carry_their_state(bank: Bank, http: aiohttp.ClientSession) -> None:
    user = bank.sandbox.user(TOKEN)
    assert user is not None
    user.connections[0].state = "wrongpass"
    user.connections[0].error_message = "Mot de passe incorrect"

    [connection] = await fast_client(http, bank.url).connections(TOKEN)

    assert (connection.id, connection.state, connection.error_message) == (
        "1",
        "wrongpass",
        "Mot de passe incorrect",
    )
    assert connection.last_update == bank.sandbox.synced_at
    assert connection.next_try is None


async def test_the_sandbox_requires_a_limit_as_powens_does(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    url = f"{bank.url}/users/me/accounts/1/transactions"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for query, code in (({}, "missingParameter"), ({"limit": "1001"}, "invalidValue")):
        async with http.get(url, headers=headers, params=query) as resp:
            assert resp.status == 400
            body = await resp.json()
        assert body["code"] == code
        assert set(body) == {"code", "description", "message", "request_id"}


async def test_a_next_page_on_another_host_is_refused(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    body = {"transactions": [], "_links": {"next": {"href": "https://elsewhere.example/2.0/x"}}}
    bank.sandbox.behave(TOKEN, Fault(status=200, body=body, endpoint="transactions"))

    with pytest.raises(ProviderBadResponse, match="next page is on another host"):
        await fast_client(http, bank.url).transactions(TOKEN, "1")

    assert bank.sandbox.requests["transactions"] == 1


async def test_a_403_is_a_setup_error_not_a_token_problem(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=403))

    with pytest.raises(ProviderSetupError) as caught:
        await fast_client(http, bank.url).accounts(TOKEN)

    assert (caught.value.kind, caught.value.status, caught.value.code) == (
        "setup_error",
        403,
        "forbidden",
    )


async def test_the_rate_is_shared_by_every_request_of_the_process(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    # Two clients (as two workers) on one bucket of 20 requests per second, burst 5.
    limiter = RateLimiter(20, burst=5)
    clients = [fast_client(http, bank.url, rate=limiter) for _ in range(2)]

    await asyncio.gather(*(c.connections(token_for(n)) for n in range(1, 11) for c in clients))

    arrivals = sorted(t for times in bank.sandbox.arrivals.values() for t in times)
    assert len(arrivals) == 20
    # Measured at the server: after the burst, no more than the rate allows.
    assert arrivals[-1] - arrivals[0] >= (20 - 5) / 20 * 0.9


async def test_amounts_given_as_strings_are_the_same_decimals(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, amounts_as_strings=True)
    client = fast_client(http, bank.url)

    accounts = await client.accounts(TOKEN)
    txs = await client.transactions(TOKEN, accounts[3].id)

    assert [a.balance for a in accounts] == [a.balance for a in demo_accounts(1)]
    assert [t.amount for t in txs] == [t.value for t in demo_transactions(demo_accounts(1)[3].id)]


async def test_429_waits_for_retry_after_then_succeeds(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=429, retry_after="1", times=1))
    calls = Calls()
    client = fast_client(http, bank.url, observe=calls)

    accounts = await client.accounts(TOKEN)

    assert len(accounts) == 5
    assert calls.outcomes == ["429", "200"]
    first, second = bank.sandbox.arrivals[TOKEN]
    # Measured at the server: the retry came no sooner than Retry-After allowed.
    assert second - first >= 0.95


async def test_retry_after_longer_than_the_client_waits_gives_up_at_once(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=429, retry_after="3600"))
    client = fast_client(http, bank.url, max_retry_after=5.0)

    with pytest.raises(ProviderUnavailable, match="Retry-After 3600 s") as caught:
        await client.accounts(TOKEN)

    assert caught.value.status == 429
    assert caught.value.code == "rateLimiting"
    assert bank.sandbox.requests["accounts"] == 1


async def test_500_then_success(bank: Bank, http: aiohttp.ClientSession) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=500, times=1))
    calls = Calls()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    client = fast_client(
        http, bank.url, observe=calls, sleep=sleep, backoff=0.4, max_backoff=10, jitter=lambda: 0.5
    )

    accounts = await client.accounts(TOKEN)

    assert len(accounts) == 5
    assert calls.outcomes == ["500", "200"]
    assert slept == [pytest.approx(0.3)]


async def test_5xx_every_time_gives_up_after_the_attempts(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=503))
    calls = Calls()
    client = fast_client(http, bank.url, attempts=3, observe=calls)

    with pytest.raises(ProviderUnavailable, match=r"HTTP 503 .* after 3 attempt") as caught:
        await client.accounts(TOKEN)

    assert caught.value.status == 503
    assert caught.value.code == "serviceUnavailable"
    assert caught.value.request_id is not None
    assert calls.outcomes == ["503", "503", "503"]
    assert bank.sandbox.requests["accounts"] == 3


async def test_a_hang_is_cut_by_the_timeout(bank: Bank, http: aiohttp.ClientSession) -> None:
    bank.sandbox.behave(TOKEN, Fault(kind="hang"))
    calls = Calls()
    client = fast_client(http, bank.url, timeout=0.3, attempts=2, observe=calls)

    with pytest.raises(ProviderUnavailable, match=r"no answer within 0.3 s after 2 attempt"):
        await client.accounts(TOKEN)

    assert calls.outcomes == ["timeout", "timeout"]
    assert all(seconds >= 0.3 for _, _, seconds in calls.seen)
    assert bank.sandbox.requests["accounts"] == 2


async def test_a_single_hang_is_retried(bank: Bank, http: aiohttp.ClientSession) -> None:
    bank.sandbox.behave(TOKEN, Fault(kind="hang", times=1, endpoint="transactions"))
    calls = Calls()
    client = fast_client(http, bank.url, timeout=0.3, observe=calls)

    txs = await client.transactions(TOKEN, "1")

    assert len(txs) == 3
    assert calls.outcomes == ["timeout", "200"]


async def test_connection_errors_are_retried_then_reported(http: aiohttp.ClientSession) -> None:
    async with Sandbox().serve() as url:
        pass  # nothing listens on that port any more
    calls = Calls()
    client = fast_client(http, url, attempts=2, observe=calls)

    with pytest.raises(ProviderUnavailable, match="connection failed after 2 attempt"):
        await client.accounts(TOKEN)

    assert calls.outcomes == ["connection_error", "connection_error"]


async def test_401_is_not_retried_and_the_token_stays_out_of_the_message(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    # A provider echoing the token in its error body must not leak it through kontod.
    body = {
        "code": "invalidToken",
        "description": f"Token {TOKEN} has been revoked",
        "message": f"Token {TOKEN} has been revoked",
        "request_id": "req-42",
    }
    bank.sandbox.behave(TOKEN, Fault(status=401, body=body))
    client = fast_client(http, bank.url)

    with pytest.raises(ProviderAuthError) as caught:
        await client.accounts(TOKEN)

    error = caught.value
    assert bank.sandbox.requests["accounts"] == 1
    assert (error.status, error.code, error.request_id) == (401, "invalidToken", "req-42")
    assert "HTTP 401" in str(error)
    assert "invalidToken" in str(error)
    assert TOKEN not in str(error)
    assert TOKEN not in repr(error)
    assert TOKEN not in (error.description or "")


async def test_unknown_token_is_refused(bank: Bank, http: aiohttp.ClientSession) -> None:
    with pytest.raises(ProviderAuthError, match="HTTP 401"):
        await fast_client(http, bank.url).accounts("not-a-sandbox-token")


async def test_other_4xx_are_not_retried_and_carry_the_error_body(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    client = fast_client(http, bank.url)

    with pytest.raises(ProviderError) as caught:
        await client.transactions(TOKEN, "999999")

    error = caught.value
    assert not isinstance(error, ProviderAuthError | ProviderUnavailable)
    assert (error.status, error.code, error.endpoint) == (404, "accountNotFound", "transactions")
    assert error.description == "No such account for this user."
    assert bank.sandbox.requests["transactions"] == 1


async def test_malformed_json_is_a_bad_response(bank: Bank, http: aiohttp.ClientSession) -> None:
    bank.sandbox.behave(TOKEN, Fault(kind="malformed"))

    with pytest.raises(ProviderBadResponse, match="not valid JSON"):
        await fast_client(http, bank.url).accounts(TOKEN)

    assert bank.sandbox.requests["accounts"] == 1


async def test_missing_accounts_list_is_a_bad_response(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(kind="missing_list"))

    with pytest.raises(ProviderBadResponse, match="no 'accounts' list"):
        await fast_client(http, bank.url).accounts(TOKEN)


@pytest.mark.parametrize(
    ("account", "match"),
    [
        ({"id": 7, "balance": "12,50"}, "balance of account 7 is not a number"),
        ({"id": 7, "balance": "NaN"}, "balance of account 7 is not a number"),
        ({"id": 7, "balance": True}, "balance of account 7 is not a number"),
        ({"name": "no id"}, "no usable 'id'"),
    ],
)
async def test_unusable_fields_are_a_bad_response(
    bank: Bank, http: aiohttp.ClientSession, account: dict[str, object], match: str
) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=200, body={"accounts": [account]}))

    with pytest.raises(ProviderBadResponse, match=match):
        await fast_client(http, bank.url).accounts(TOKEN)


async def test_missing_balance_is_none_and_big_numbers_stay_exact(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    accounts = [{"id": "a1"}, {"id": 2, "balance": 12345678901234567890}]
    bank.sandbox.behave(TOKEN, Fault(status=200, body={"accounts": accounts}))

    got = await fast_client(http, bank.url).accounts(TOKEN)

    assert [a.balance for a in got] == [None, Decimal("12345678901234567890")]


async def test_transaction_fields_fall_back_as_konto_does(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    tx = {"id": 9, "rdate": "2026-02-03", "amount": "-4.20", "wording": "Café", "category": None}
    bank.sandbox.behave(TOKEN, Fault(status=200, body={"transactions": [tx]}))

    [got] = await fast_client(http, bank.url).transactions(TOKEN, "1")

    assert (got.id, got.date, got.amount, got.label, got.category) == (
        "9",
        date(2026, 2, 3),
        Decimal("-4.20"),
        "Café",
        None,
    )


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0.25", 0.25),
        ("0", 0.0),
        ("-1", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("Sun, 01 Mar 2026 12:01:30 GMT", 90.0),
        ("Sun, 01 Mar 2026 11:00:00 GMT", 0.0),
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header, NOW) == expected


def test_retry_after_date_is_relative_to_now() -> None:
    later = NOW + timedelta(seconds=10)
    assert retry_after_seconds("Sun, 01 Mar 2026 12:01:30 GMT", later) == 80.0


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [
        (1, 0.0, 0.25),
        (1, 1.0, 0.5),
        (2, 0.0, 0.5),
        (3, 0.5, 1.5),
        (10, 0.0, 15.0),  # capped at 30 s, half of it fixed
        (10, 1.0, 30.0),
    ],
)
def test_backoff_doubles_with_jitter_and_a_cap(
    attempt: int, jitter: float, expected: float
) -> None:
    assert backoff_seconds(attempt, base=0.5, cap=30.0, jitter=jitter) == pytest.approx(expected)


async def test_nul_characters_the_database_cannot_store_are_dropped(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    body = {
        "transactions": [
            {"id": "7\u00008", "date": "2026-01-02", "value": "-4.20", "wording": "caf\u0000é"}
        ]
    }
    bank.sandbox.behave(TOKEN, Fault(status=200, body=body, endpoint="transactions"))
    client = fast_client(http, bank.url)

    [tx] = await client.transactions(TOKEN, "1")

    assert (tx.id, tx.label, tx.amount) == ("78", "café", Decimal("-4.20"))


# Hostile answers: bodies read whole under a cap, JSON of bounded depth, bounded paging.

MiB = 1024 * 1024


async def test_a_body_sent_in_two_writes_with_a_pause_is_read_whole(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(kind="split", pause=0.3, endpoint="accounts"))

    accounts = await fast_client(http, bank.url).accounts(TOKEN)

    assert [a.balance for a in accounts] == [a.balance for a in demo_accounts(1)]


async def test_a_body_over_the_cap_is_refused_without_reading_the_rest(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    # A valid JSON answer of 64 MiB: read whole, it would parse as an empty list of accounts.
    bank.sandbox.behave(TOKEN, Fault(kind="oversized", size=64 * MiB, endpoint="accounts"))
    calls = Calls()

    with pytest.raises(ProviderBadResponse) as caught:
        await fast_client(http, bank.url, observe=calls).accounts(TOKEN)

    message = str(caught.value)
    assert "larger than 8388608 bytes (8 MiB)" in message
    assert "KONTOD_PROVIDER_MAX_BODY" in message
    assert caught.value.kind == "bad_response"
    # Not retried, and the connection was dropped: the sandbox could not write much more
    # than the cap and what the loopback socket buffers hold.
    assert calls.outcomes == ["200"]
    await wait_streamed(bank.sandbox)
    assert bank.sandbox.streamed[0] < 32 * MiB


async def test_an_endless_body_is_cut_at_the_cap_that_was_set(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.behave(TOKEN, Fault(kind="endless", endpoint="connections"))
    client = fast_client(http, bank.url, max_body=MiB)

    with pytest.raises(ProviderBadResponse, match=r"larger than 1048576 bytes \(1 MiB\)"):
        await client.connections(TOKEN)

    await wait_streamed(bank.sandbox)
    assert bank.sandbox.streamed[0] < 16 * MiB


async def wait_streamed(sandbox: Sandbox) -> None:
    """The streaming answer records its bytes when its handler ends, after the client left."""
    for _ in range(500):
        if sandbox.streamed:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the streaming answer never ended")


@pytest.mark.parametrize("status", [200, 400, 500])
async def test_deeply_nested_json_is_refused_before_any_recursion(
    bank: Bank, http: aiohttp.ClientSession, status: int
) -> None:
    bank.sandbox.behave(TOKEN, Fault(status=status, body=deep_json(100_000)))

    with pytest.raises(ProviderError) as caught:
        await fast_client(http, bank.url, attempts=1).accounts(TOKEN)

    assert caught.value.status == status
    if status == 200:
        assert isinstance(caught.value, ProviderBadResponse)
        assert "nested deeper than 64 levels" in str(caught.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_literals_are_refused(
    bank: Bank, http: aiohttp.ClientSession, literal: str
) -> None:
    user = bank.sandbox.user(TOKEN)
    assert user is not None
    user.accounts[0].balance = Raw(literal)

    with pytest.raises(ProviderBadResponse, match=f"{literal} is not a number"):
        await fast_client(http, bank.url).accounts(TOKEN)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1e200000", "1.5e308"])
async def test_numbers_beyond_float_stay_exact_decimals_never_infinity(
    bank: Bank, http: aiohttp.ClientSession, number: str
) -> None:
    user = bank.sandbox.user(TOKEN)
    assert user is not None
    user.accounts[0].balance = Raw(number)

    accounts = await fast_client(http, bank.url).accounts(TOKEN)

    assert accounts[0].balance == Decimal(number)
    assert accounts[0].balance is not None and accounts[0].balance.is_finite()


async def test_control_characters_in_an_error_body_are_left_out(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    body = {"code": "bad\u0000code", "description": "one\u0000two\nthree\x1b]0;title\x07"}
    bank.sandbox.behave(TOKEN, Fault(status=400, body=body))

    with pytest.raises(ProviderError) as caught:
        await fast_client(http, bank.url).accounts(TOKEN)

    error = caught.value
    assert (error.code, error.description) == ("bad code", "one two three ]0;title")
    assert not any(ord(ch) < 32 for ch in str(error))


def transactions_for(user: PowensUser, account_id: int, n: int) -> None:
    """``n`` transactions on one account of ``user``."""
    day = date(2026, 2, 1)
    user.transactions[account_id] = [
        SandboxTransaction(
            id=account_id * 1000 + k,
            id_account=account_id,
            date=day - timedelta(days=k),
            value=Decimal("-1.00"),
            wording=f"CB SHOP {k}",
            category=None,
            last_update=datetime(2026, 2, 1, tzinfo=UTC),
        )
        for k in range(n)
    ]


async def test_paging_has_a_total_cap_in_transactions(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    user = bank.sandbox.user(TOKEN)
    assert user is not None
    transactions_for(user, 1, 12)
    client = fast_client(http, bank.url, max_items=9)

    assert len(await fast_client(http, bank.url).transactions(TOKEN, "1", limit=5)) == 12
    with pytest.raises(ProviderBadResponse, match="more than 9 transactions"):
        await client.transactions(TOKEN, "1", limit=5)
    # The third page was never asked for: the second one passed the cap.
    assert len(bank.sandbox.queries) == 3 + 2


async def test_paging_has_a_total_cap_in_bytes(bank: Bank, http: aiohttp.ClientSession) -> None:
    user = bank.sandbox.user(TOKEN)
    assert user is not None
    transactions_for(user, 1, 50)
    client = fast_client(http, bank.url, max_bytes=4096)

    with pytest.raises(ProviderBadResponse, match=r"more than 4096 bytes \(4 KiB\)"):
        await client.transactions(TOKEN, "1", limit=2)
    assert len(bank.sandbox.queries) < 25


async def test_a_deep_answer_is_the_failure_of_that_user_only(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    conn_2 = await seed_user(pool, 2)
    bank.sandbox.behave(token_for(2), Fault(status=200, body=deep_json(100_000)))
    ctx = RunContext(
        run_id=1,
        job="refresh-stale-connections",
        trigger="manual",
        scheduled_for=None,
        started_at=datetime.now(UTC),
        log=structlog.get_logger(),
    )

    await make_body(
        pool, fast_client(http, bank.url), stale_after=timedelta(days=7), concurrency=2
    )(ctx)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 1)
    row = await pool.fetchrow(
        "SELECT error, error_kind FROM kontod_connections WHERE connection_id = $1", conn_2
    )
    assert row is not None
    assert row["error_kind"] == "bad_response"
    assert "nested deeper than 64 levels" in row["error"]


async def test_a_length_announced_over_the_cap_is_refused_before_reading(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    accounts = [{"id": n, "balance": "1.00"} for n in range(200)]
    bank.sandbox.behave(TOKEN, Fault(status=200, body={"accounts": accounts}))

    with pytest.raises(ProviderBadResponse) as caught:
        await fast_client(http, bank.url, max_body=1024).accounts(TOKEN)

    assert "larger than 1024 bytes (1 KiB); it announced" in str(caught.value)
    assert len(await fast_client(http, bank.url, max_body=64 * 1024).accounts(TOKEN)) == 200


async def test_a_category_object_gives_its_name_and_an_id_less_transaction_its_key_parts(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    items = [
        {"id": 1, "date": "2026-11-02", "value": -12.5, "category": {"name": "Courses"},
         "categories": [{"code": "food"}], "original_wording": "CB"},
        {"date": None, "rdate": "2026-11-03", "value": 100.0, "wording": "VIR"},
    ]  # fmt: skip
    bank.sandbox.behave(
        TOKEN,
        Fault(status=200, endpoint="transactions", body={"transactions": items, "_links": {}}),
    )

    first, nameless = await fast_client(http, bank.url).transactions(TOKEN, "1")

    assert (first.category, nameless.category) == ("Courses", None)
    assert nameless.id is None
    assert (nameless.date_text, nameless.value_text) == ("2026-11-03", "100")
