"""The docs point somewhere real: every web address in the README, the docs site, the rules and
the deployment files is loopback, a service that exists and that kontod talks to or names, or a
placeholder that reads as one. (Links inside the docs site are checked by `make docs`, which
fails on a broken link or anchor.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Host -> why an address there is real.
KNOWN_HOSTS = {
    "127.0.0.1": "loopback: kontod, its sandboxes and the monitoring stack on one machine",
    "localhost": "loopback",
    "prometheus": "the Prometheus service of compose.yaml",
    "alertmanager": "the Alertmanager service of compose.yaml",
    "kontod": "the kontod service of compose.yaml",
    "hc-ping.com": "Healthchecks' ping endpoint (KONTOD_PING_URL_<JOB>)",
    "healthchecks.io": "Healthchecks, the ping service kontod speaks to",
    "www.ecb.europa.eu": "the ECB's daily reference rates (KONTOD_FIAT_RATES_URL)",
    "api.coingecko.com": "CoinGecko's price API (KONTOD_CRYPTO_PRICES_URL)",
    "files.data.gouv.fr": "the public geo-DVF files (KONTOD_DVF_URL)",
}
# Placeholders an operator replaces, which name no real host.
PLACEHOLDER = re.compile(
    r"^(<[^>]+>|\{[a-z_]+\}|…|[A-Z_]+|example\.[a-z.]+|[a-z0-9-]+\.example\.[a-z]+|.*\.invalid)$"
)
FILES = [
    ROOT / "README.md",
    ROOT / "alerts.yml",
    ROOT / "compose.yaml",
    ROOT / "Dockerfile",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file()),
]
ADDRESS = re.compile(r"https?://([^/\s\"'`)<>:]+|<[^>]+>)")


def test_every_address_in_the_docs_and_deploy_files_points_somewhere_real() -> None:
    unknown = []
    for path in FILES:
        for host in ADDRESS.findall(path.read_text()):
            if host not in KNOWN_HOSTS and not PLACEHOLDER.match(host):
                unknown.append(f"{path.relative_to(ROOT)}: {host}")
    assert not unknown, "addresses that point nowhere:\n" + "\n".join(unknown)


def test_the_check_finds_an_address_that_points_nowhere() -> None:
    assert ADDRESS.findall("see https://github.com/konto/kontod/blob/main/x") == ["github.com"]
    assert "github.com" not in KNOWN_HOSTS and not PLACEHOLDER.match("github.com")


def test_the_front_doors_links_lead_to_pages_and_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links to no page of the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
