"""External programs the tests need: found on PATH, or the test fails with how to install them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# Administration tools live in sbin, which a CI user's PATH often lacks.
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def require_program(name: str, debian_package: str = "", *, install: str = "") -> str:
    """The full path of ``name``; fails the test (never skips it) with the install command:
    ``install`` when given, else ``apt-get install debian_package``."""
    found = shutil.which(name) or shutil.which(name, path=_SBIN)
    if found is None:
        command = install or f"apt-get install {debian_package}"
        pytest.fail(
            f"`{name}` is not installed; this test needs it. install {name}: {command}",
            pytrace=False,
        )
    return found


def kontod_script() -> str:
    """The ``kontod`` console script of the environment running the tests; fails with a hint."""
    script = Path(sys.executable).parent / "kontod"
    if not script.is_file():
        pytest.fail(
            f"the kontod console script is missing at {script}; install the project into this "
            f"environment with `{sys.executable} -m pip install -e '.[dev]'`",
            pytrace=False,
        )
    return str(script)
