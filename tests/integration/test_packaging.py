"""kontod as a package: an sdist and a wheel built with `python -m build`, checked by twine, and
the wheel installed into a fresh virtual environment that then runs kontod.

The build starts from the files the Dockerfile's build stage copies (pyproject.toml, README.md,
kontod/), so a file the package needs but that list lacks fails here as it would in the image.
The fresh environment gets kontod from the wheel alone (`--no-deps --no-index`); its
dependencies are this test environment's, reached through a .pth file, so nothing is
downloaded. The build itself fetches setuptools from the package index pip already uses, as any
isolated build does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from kontod import db

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# What the image's build stage copies from the checkout (Dockerfile, .dockerignore).
CONTEXT = ("pyproject.toml", "README.md", "kontod")


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path


def package_files() -> set[str]:
    """Every file of the kontod package in the checkout, as paths from the repository."""
    return {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "kontod").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    try:
        import build  # noqa: F401  (only its presence: it runs as `python -m build`)
    except ImportError:
        pytest.fail(
            f"`build` is not installed; `{sys.executable} -m pip install -e '.[dev]'`",
            pytrace=False,
        )
    source = tmp_path_factory.mktemp("source")
    for name in CONTEXT:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    return Built(wheels[0], sdists[0])


@pytest.fixture(scope="module")
def fresh(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with kontod installed from the wheel only."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    install += ["--no-deps", "--no-index", "--no-compile", "--quiet", str(built.wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The dependencies: this environment's, after the fresh one's own site-packages.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def run_fresh(venv: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a program of the fresh environment outside the checkout; its output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KONTOD_", "PYTHON"))}
    done = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=venv,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def test_twine_accepts_the_wheel_and_the_sdist(built: Built) -> None:
    twine = Path(sys.executable).parent / "twine"
    assert twine.is_file(), f"twine is missing; `{sys.executable} -m pip install -e '.[dev]'`"
    done = subprocess.run(
        [str(twine), "check", "--strict", str(built.wheel), str(built.sdist)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_the_wheel_and_the_sdist_hold_every_file_of_the_package(built: Built) -> None:
    expected = package_files()
    assert any(name.endswith(".sql") for name in expected), expected
    with zipfile.ZipFile(built.wheel) as wheel:
        in_wheel = set(wheel.namelist())
    assert expected - in_wheel == set(), sorted(expected - in_wheel)
    with tarfile.open(built.sdist) as sdist:
        root = f"kontod-{VERSION}/"
        in_sdist = {m.name.removeprefix(root) for m in sdist.getmembers() if m.isfile()}
    missing = (expected | {"pyproject.toml", "README.md"}) - in_sdist
    assert missing == set(), sorted(missing)


def test_kontod_from_the_wheel_runs_in_a_fresh_environment(fresh: Path) -> None:
    assert run_fresh(fresh, "kontod", "--version").strip() == f"kontod {VERSION}"
    assert "migrate" in run_fresh(fresh, "kontod", "--help")
    # The package imported is the wheel's, not the checkout's.
    where = run_fresh(fresh, "python", "-c", "import kontod; print(kontod.__file__)").strip()
    assert Path(where).is_relative_to(fresh), where
    names = run_fresh(
        fresh,
        "python",
        "-c",
        "import json; from kontod import db; print(json.dumps([m.name for m in db.migrations()]))",
    )
    assert json.loads(names) == [m.name for m in db.migrations()]


async def test_kontod_from_the_wheel_migrates_a_database(fresh: Path, empty_dsn: str) -> None:
    run_fresh(fresh, "kontod", "migrate", env={"KONTOD_DATABASE_URL": empty_dsn})
    conn = await asyncpg.connect(empty_dsn)
    try:
        applied = await conn.fetchval("SELECT count(*) FROM kontod_migrations")
    finally:
        await conn.close()
    assert applied == len(db.migrations()) > 0
