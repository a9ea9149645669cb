"""A private PostgreSQL server per test session, on a free loopback port, that tests may kill and restart.

``POSTGRES_URL`` points the tests at an existing server instead (then it cannot be stopped, and
outage tests skip). Otherwise Debian's ``postgresql`` binaries (``/usr/lib/postgresql/*/bin``, not
on PATH) run a throwaway cluster in a temp directory: ``initdb`` and ``postgres`` run as the
``postgres`` user when the tests run as root (``initdb`` refuses root). With neither, PostgreSQL
tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.redis_server import free_port


def _binaries() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` (PATH first, then Debian's layout)."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _clean_env() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PG", "LC_")) and name != "LANG"
    }


class PostgresServer:
    """A ``postgres`` process we own: ``kill()`` crashes it (postmaster and every backend),
    ``start()`` brings it back on the same port and data directory."""

    def __init__(self, bindir: Path, directory: Path) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            postgres = pwd.getpwnam("postgres")
            os.chown(directory, postgres.pw_uid, postgres.pw_gid)
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--locale=C",
                "-E",
                "UTF8",
                "--auth=trust",
                "--no-sync",
            ]
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def can_stop(self) -> bool:
        return True

    def _run(self, command: list[str]) -> None:
        subprocess.run(
            command,
            user=self._user,
            check=True,
            env=_clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.directory,
        )

    def _log(self) -> int:
        return os.open(self.directory / "postgres.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.directory),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            env=_clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=self._log(),
            cwd=self.directory,
            start_new_session=True,
            user=self._user,
        )
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not start on port {self.port} (exit {self.process.poll()})"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Crash the server: SIGSTOP the postmaster, SIGKILL it and every backend, reap them."""
        if self.process is None:
            return
        postmaster = _postmaster_pid(self.data)
        if postmaster is not None:
            children = _children(postmaster)
            _signal(postmaster, signal.SIGSTOP)
            children = sorted(set(children) | set(_children(postmaster)))
            for pid in [postmaster, *children]:
                _signal(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None
        pid_file = self.data / "postmaster.pid"
        deadline = time.monotonic() + 10
        while postmaster is not None and _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.01)
        # orphaned backends may linger as zombies, which a new postmaster takes for live owners
        pid_file.unlink(missing_ok=True)
        (self.directory / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ExternalPostgres:
    """A server named by ``POSTGRES_URL``: usable, but not ours to stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def can_stop(self) -> bool:
        return False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pytest.skip("POSTGRES_URL points at a server these tests cannot stop")


def postgres_unavailable(reason: str) -> None:
    """Skip locally, fail under CI=true (CI must exercise the PostgreSQL store)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(reason)


def make_postgres_server() -> PostgresServer | ExternalPostgres | None:
    url = os.environ.get("POSTGRES_URL")
    if url:
        return ExternalPostgres(url)
    bindir = _binaries()
    if bindir is None:
        return None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="resilient-grpc-postgres-")))
    server.start()
    return server
