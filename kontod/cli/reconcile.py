"""``kontod reconcile transactions``: the report of the duplicates found and removed."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from kontod.konto.reconcile import Report


def print_report(report: Report, dry_run: bool, as_json: bool, out: TextIO | None = None) -> None:
    """Per account, the unkeyed twins found and removed, and the totals; on a dry run nothing
    is removed and the report says so."""
    out = out or sys.stdout
    accounts = [
        {"bank_account_id": account, "found": found, "removed": report.removed.get(account, 0)}
        for account, found in report.found.items()
    ]
    if as_json:
        body = {
            "dry_run": dry_run,
            "accounts": accounts,
            "found": report.total_found,
            "removed": report.total_removed,
        }
        print(json.dumps(body, indent=2), file=out)
        return
    if accounts:
        print(f"{'ACCOUNT':>10}{'FOUND':>8}{'REMOVED':>10}", file=out)
        for a in accounts:
            print(f"{a['bank_account_id']:>10}{a['found']:>8}{a['removed']:>10}", file=out)
    verb = "would remove" if dry_run else "removed"
    print(
        f"{report.total_found} duplicate transaction(s) in {len(accounts)} account(s);"
        f" {verb} {report.total_found if dry_run else report.total_removed}"
        + (" (dry run: nothing changed)" if dry_run else ""),
        file=out,
    )
