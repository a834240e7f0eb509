"""kontod under the real PM2, started from deploy/pm2/ecosystem.config.cjs.

Each test has a PM2 daemon of its own (a private PM2_HOME), killed at the end, and kontod on the
test's PostgreSQL database: the database URL is a file in the credentials folder, the other
settings a settings file read with systemd's rules. Needs `pm2` (npm install -g pm2) and `node`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import quiet_schedule
from tests.integration.test_lifecycle import free_port, health
from tests.programs import kontod_script, require_program

REPO = Path(__file__).resolve().parents[2]
ECOSYSTEM = REPO / "deploy" / "pm2" / "ecosystem.config.cjs"
PM2_INSTALL = "npm install -g pm2"


@dataclass
class Pm2:
    """A PM2 daemon of the test's own, and the places the ecosystem file is pointed at."""

    program: str
    env: dict[str, str]
    env_file: Path
    credentials: Path
    logs: Path

    def __call__(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.program, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"pm2 {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def jlist(self) -> list[dict[str, Any]]:
        """What `pm2 jlist` says of every process; the raw text is checked by callers too."""
        apps: list[dict[str, Any]] = json.loads(self("jlist").stdout)
        return apps

    def kontod(self) -> dict[str, Any]:
        apps = [a for a in self.jlist() if a["name"] == "kontod"]
        assert len(apps) == 1, apps
        return apps[0]

    def logged(self) -> str:
        """kontod's two log files, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("*.log")))


def pm2_environment(home: Path, folder: Path) -> dict[str, str]:
    """The environment of `pm2`: the test's own, less kontod's settings, plus the private
    PM2_HOME and the ecosystem file's four places."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KONTOD_", "PM2_", "pm_")) and k != "DATABASE_URL"
    }
    # A setting in the shell that PM2 must not pass on (the ecosystem's filter_env).
    env["KONTOD_ADMIN_TOKEN"] = "from-the-shell-not-the-file"
    return env | {
        "PM2_HOME": str(home),
        "KONTOD_PM2_VENV": str(Path(kontod_script()).parent.parent),
        "KONTOD_PM2_ENV_FILE": str(folder / "kontod.env"),
        "KONTOD_PM2_CREDENTIALS": str(folder / "credentials"),
        "KONTOD_PM2_LOG_DIR": str(folder / "logs"),
    }


@pytest.fixture
def pm2() -> Iterator[Pm2]:
    program = require_program("pm2", install=PM2_INSTALL)
    require_program("node", install="apt-get install nodejs")
    # Short: PM2's sockets live in PM2_HOME, and AF_UNIX paths stop at 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="kontod-pm2-"))
    home = folder / "home"
    env = pm2_environment(home, folder)
    (folder / "credentials").mkdir(mode=0o700)
    (folder / "logs").mkdir()
    manager = Pm2(program, env, folder / "kontod.env", folder / "credentials", folder / "logs")
    try:
        yield manager
    finally:
        daemon_pid = _pid_in(home / "pm2.pid")
        subprocess.run([program, "kill"], env=env, capture_output=True, timeout=90, check=False)
        if daemon_pid is not None:
            _wait_gone(daemon_pid, "the PM2 daemon")
        shutil.rmtree(folder, ignore_errors=True)


def _pid_in(path: Path) -> int | None:
    """The pid on the first line of a pid file, if there is one."""
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"{what} (pid {pid}) still runs"
        time.sleep(0.1)


def wait_until(check: Callable[[], bool], what: str, pm2: Pm2, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s:\n{pm2.jlist()}\n{pm2.logged()}")
        time.sleep(0.2)


def write_settings(pm2: Pm2, dsn: str | None, port: int, state: Path, **more: str) -> None:
    """The settings file (systemd's quoting, the way the shipped example writes a cron line)
    and the database URL, if any, as a credential."""
    lines = [
        "# kontod under PM2, written by the test",
        f"KONTOD_LISTEN=127.0.0.1:{port}",
        "KONTOD_TIMEZONE=UTC   ",
        f"KONTOD_STATE_DIR='{state}'",
        # No catch-up run at any time of day: the test is about the process, not a job.
        f'KONTOD_SNAPSHOT_SCHEDULE="{quiet_schedule()}"',
        f'  KONTOD_REFRESH_SCHEDULE = "{quiet_schedule()}"',
        "KONTOD_LOG_FORMAT=json",
        *(f"{name}={value}" for name, value in more.items()),
    ]
    pm2.env_file.write_text("\n".join(lines) + "\n")
    if dsn is None:
        return
    url = pm2.credentials / "database_url"
    url.write_text(dsn + "\n")
    url.chmod(0o600)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_starts_runs_and_stops_kontod_cleanly(dsn: str, pm2: Pm2, tmp_path: Path) -> None:
    port = free_port()
    write_settings(pm2, dsn, port, tmp_path / "state")

    pm2("start", str(ECOSYSTEM))
    wait_until(lambda: health(port) == 200, "/health answered 200", pm2)

    app = pm2.kontod()
    env = app["pm2_env"]
    assert env["status"] == "online", env["status"]
    assert env["restart_time"] == 0, pm2.logged()
    assert env["exec_interpreter"] == "none"
    pid = int(app["pid"])
    # The console script's own line: its Python, the script, "run" (no node in between).
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[1:3] == [kontod_script(), "run"], cmdline
    # The settings as systemd would read them, and nothing of the shell's KONTOD_*.
    seen = environ_of(pid)
    assert seen["KONTOD_SNAPSHOT_SCHEDULE"] == quiet_schedule()
    assert seen["KONTOD_REFRESH_SCHEDULE"] == quiet_schedule()
    assert seen["KONTOD_TIMEZONE"] == "UTC"
    assert seen["KONTOD_STATE_DIR"] == str(tmp_path / "state")
    assert "KONTOD_ADMIN_TOKEN" not in seen
    assert seen["CREDENTIALS_DIRECTORY"] == str(pm2.credentials)
    # The database URL holds a password: PM2 never had it, so shows it nowhere.
    assert dsn not in pm2("jlist").stdout
    assert dsn not in pm2("env", str(env["pm_id"])).stdout
    # kontod's JSON log lines land in the log files the ecosystem names.
    wait_until(lambda: '"event"' in pm2.logged(), "kontod's log lines in its log files", pm2)

    pm2("stop", "kontod")
    _wait_gone(pid, "kontod")
    stopped = pm2.kontod()["pm2_env"]
    assert stopped["status"] == "stopped"
    # SIGINT made kontod stop in order: exit 0, not a kill.
    assert stopped["exit_code"] == 0, pm2.logged()
    assert health(port) == 0

    pm2("delete", "kontod")
    assert pm2.jlist() == []


def test_stops_kontod_and_its_embedded_postgresql(pm2: Pm2, tmp_path: Path) -> None:
    """SIGINT goes to kontod alone (treekill off), and kontod stops the PostgreSQL it started:
    pg_ctl detached that server, so no one else would."""
    port = free_port()
    write_settings(pm2, None, port, tmp_path / "state", KONTOD_EMBEDDED="1")
    pm2("start", str(ECOSYSTEM))
    wait_until(lambda: health(port) == 200, "/health answered 200", pm2, timeout=120)
    pid = int(pm2.kontod()["pid"])
    # pg_ctl detaches the server from kontod: it is found by its data directory's pid file.
    postmaster = _pid_in(tmp_path / "state" / "pgdata" / "postmaster.pid")
    assert postmaster is not None and alive(postmaster), pm2.logged()

    pm2("stop", "kontod")
    _wait_gone(pid, "kontod")
    _wait_gone(postmaster, "the embedded PostgreSQL kontod started")
    assert pm2.kontod()["pm2_env"]["exit_code"] == 0, pm2.logged()
    pm2("delete", "kontod")


def test_restarts_kontod_after_a_crash(dsn: str, pm2: Pm2, tmp_path: Path) -> None:
    port = free_port()
    write_settings(pm2, dsn, port, tmp_path / "state")
    pm2("start", str(ECOSYSTEM))
    wait_until(lambda: health(port) == 200, "/health answered 200", pm2)
    first = int(pm2.kontod()["pid"])

    os.kill(first, signal.SIGKILL)
    _wait_gone(first, "the killed kontod")

    def back() -> bool:
        app = pm2.kontod()
        return int(app["pid"] or 0) not in (0, first) and health(port) == 200

    wait_until(back, "kontod started again after SIGKILL", pm2)
    env = pm2.kontod()["pm2_env"]
    assert env["restart_time"] == 1
    assert env["status"] == "online"
    pm2("delete", "kontod")


def test_a_bad_setting_leaves_kontod_stopped_with_the_reason(
    dsn: str, pm2: Pm2, tmp_path: Path
) -> None:
    write_settings(pm2, dsn, free_port(), tmp_path / "state", KONTOD_TIMEZONE="Mars/Olympus")
    pm2("start", str(ECOSYSTEM))

    def ended() -> bool:
        return bool(pm2.kontod()["pm2_env"].get("exit_code") == 2)

    wait_until(ended, "kontod exited 2 on a bad setting", pm2)
    time.sleep(2.5)  # longer than the first back-off: a restart would show by now
    app = pm2.kontod()
    env = app["pm2_env"]
    assert app["pid"] == 0
    assert env["restart_time"] == 0, env
    # PM2 leaves the name "waiting restart" on a process it will not restart when a restart
    # delay is set (its exit handler sets it before it reads stop_exit_codes): not "online".
    assert env["status"] in ("stopped", "waiting restart"), env["status"]
    assert "KONTOD_TIMEZONE" in (pm2.logs / "kontod.err.log").read_text(), pm2.logged()
    pm2("delete", "kontod")


def test_pm2_start_shows_a_bad_settings_line(pm2: Pm2) -> None:
    pm2.env_file.write_text("KONTOD_TIMEZONE=UTC\nKONTOD_LISTEN\n")
    done = subprocess.run(
        [pm2.program, "start", str(ECOSYSTEM)],
        env=pm2.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode != 0
    assert f'{pm2.env_file}, line 2: no "=" (VAR=value)' in done.stdout + done.stderr
    assert pm2.jlist() == []


def _node_read(env_file: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """Load the ecosystem file in node with ``env_file`` as its settings file."""
    node = require_program("node", install="apt-get install nodejs")
    script = f"console.log(JSON.stringify(require({json.dumps(str(ECOSYSTEM))}).apps[0].env))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONTOD_")}
    env |= {"KONTOD_PM2_ENV_FILE": str(env_file), **extra}
    return subprocess.run(
        [node, "-e", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_settings_file_is_read_with_systemds_quoting(tmp_path: Path) -> None:
    env_file = tmp_path / "kontod.env"
    env_file.write_text(
        "# comment\n"
        "; another\n"
        "\n"
        'KONTOD_SNAPSHOT_SCHEDULE="0 2 * * *"\n'
        "KONTOD_REFRESH_SCHEDULE='0 */6 * * *'\n"
        "PLAIN = spaced value  \n"
        'ESCAPED="a \\"quoted\\" \\$HOME \\n"\n'
        "JOINED=one\\\n"
        "two\n"
        'SPREAD="first\n'
        'second"\n'
        "HASH=a#b\n"
    )
    done = _node_read(env_file)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["KONTOD_SNAPSHOT_SCHEDULE"] == "0 2 * * *"
    assert got["KONTOD_REFRESH_SCHEDULE"] == "0 */6 * * *"
    assert got["PLAIN"] == "spaced value"
    assert got["ESCAPED"] == 'a "quoted" $HOME \\n'
    assert got["JOINED"] == "onetwo"
    assert got["SPREAD"] == "first\nsecond"
    assert got["HASH"] == "a#b"


def test_the_shipped_example_loads_as_no_settings() -> None:
    done = _node_read(REPO / "deploy" / "systemd" / "kontod.env.example")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert {k for k in got if k.startswith("KONTOD_")} == set(), got


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("KONTOD_TIMEZONE\n", 'line 1: no "=" (VAR=value)'),
        ("# ok\nBAD-NAME=1\n", 'line 2: "BAD-NAME" is not a variable name'),
        ('A=1\nKONTOD_SNAPSHOT_SCHEDULE="0 2 * * *\n', 'line 2: the " quote is never closed'),
    ],
)
def test_a_bad_settings_line_is_named(tmp_path: Path, text: str, error: str) -> None:
    env_file = tmp_path / "kontod.env"
    env_file.write_text(text)
    done = _node_read(env_file)
    assert done.returncode != 0
    assert f"{env_file}, {error}" in done.stderr, done.stderr


def test_a_missing_settings_file_named_by_the_operator_is_an_error(tmp_path: Path) -> None:
    done = _node_read(tmp_path / "nowhere.env")
    assert done.returncode != 0
    assert f"{tmp_path / 'nowhere.env'}: no such settings file" in done.stderr, done.stderr
