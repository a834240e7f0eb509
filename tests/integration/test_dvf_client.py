"""The DVF client against the sandbox: the listing, conditional requests, the size cap and
answers that are no DVF file."""

from __future__ import annotations

import aiohttp
import pytest

from kontod.demo.dvf_sandbox import DvfSandbox, Lot, Mutation
from kontod.providers.dvf import DvfBadAnswer, DvfClient, DvfUnavailable, Validators

SALES = [Mutation(f"m-{i}", "2023-01-10", "200000", [Lot("Maison", "80")]) for i in range(40)]


async def test_listing_conditional_requests_cap_and_garbage(http: aiohttp.ClientSession) -> None:
    sandbox = DvfSandbox(listed={2021})
    sandbox.put(2023, "2A004", SALES)
    async with sandbox.serve() as base:
        client = DvfClient(http, base, attempts=2, backoff=0.01, rate=1000)
        assert await client.years() == [2023, 2021]
        got = await client.fetch("2a004", 2023, None)
        assert got.state == "changed" and got.grouping is not None
        assert len(got.grouping.sales) == 40
        assert sandbox.requests["/geo-dvf/latest/csv/2023/communes/2A/2A004.csv"] == 1
        # Last-Modified alone is enough to get a 304; a stale ETag is not.
        only_date = Validators(None, got.validators.last_modified)
        assert (await client.fetch("2A004", 2023, only_date)).state == "unchanged"
        stale = Validators('"not-the-etag"', None)
        assert (await client.fetch("2A004", 2023, stale)).state == "changed"
        assert (await client.fetch("2A004", 2022, None)).state == "missing"
        # A file above the cap is that file's error, read no further.
        small = DvfClient(http, base, attempts=1, max_body=1024)
        with pytest.raises(DvfBadAnswer, match="larger than 1024 bytes"):
            await small.fetch("2A004", 2023, None)
        sandbox.fail("2A004", "garbage", times=1)
        with pytest.raises(DvfBadAnswer, match="no column id_mutation"):
            await client.fetch("2A004", 2023, None)
        sandbox.fail("2A004", "http_500")
        with pytest.raises(DvfUnavailable, match="HTTP 500 after 2 attempt"):
            await client.fetch("2A004", 2023, None)
