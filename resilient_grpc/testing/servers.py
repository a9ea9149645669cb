"""Private Redis and PostgreSQL servers for tests and benchmarks, on free loopback ports.

A test of a service that deduplicates with :class:`~resilient_grpc.stores.RedisStore` or
:class:`~resilient_grpc.stores.PostgresStore` wants a real server it owns: one it can crash in the
middle of a call and start again on the same port and data, without touching a server someone
else uses. :class:`RedisServer` and :class:`PostgresServer` are that, with no dependency beyond
the server binaries themselves (no Redis or PostgreSQL client library is needed to start one)::

    with RedisServer() as redis_server:
        store = RedisStore.from_url(redis_server.url)
        ...
        redis_server.stop()   # a crash: SIGKILL, nothing saved
        redis_server.start()  # back on the same port

Both listen on ``127.0.0.1`` only, keep their files in a directory of their own (a fresh temp
directory unless one is given, removed by :meth:`~RedisServer.close`), and raise
:class:`ServerUnavailableError` when their binaries are missing, so a test suite can skip.

:class:`~resilient_grpc.testing.cluster.RedisCluster` joins six :class:`RedisServer` into a Redis
Cluster.

PostgreSQL: Debian installs ``initdb`` and ``postgres`` off ``PATH`` (``/usr/lib/postgresql/*/bin``)
and is looked up there too. ``initdb`` refuses to run as root, so as root both run as the
``postgres`` user. The postmaster is our own child (not daemonized by ``pg_ctl``), and
:meth:`PostgresServer.stop` kills it *and* its backends (each runs in its own session, and a
live one blocks the next start with "pre-existing shared memory block is still in use").
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

__all__ = [
    "Launcher",
    "PostgresServer",
    "RedisServer",
    "ServerUnavailableError",
    "free_port",
    "postgres_binaries",
    "wait_until",
]

HOST = "127.0.0.1"


class ServerUnavailableError(RuntimeError):
    """The server's binaries are not installed (or, as root, there is no ``postgres`` user)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``ready()`` every ``interval`` s until it is true; raise ``RuntimeError`` naming
    ``what`` after ``timeout`` s, or as soon as ``process`` (the server being waited for) exits.

    ``ready`` returning false or raising ``OSError`` both mean "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:g} s")
        time.sleep(interval)


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(timeout=10)


class Launcher(ABC):
    """What every launcher here shares: a directory of its own files, :meth:`start` /
    :meth:`stop`, and :meth:`close` / ``with`` (start if not running; stop and remove the
    directory if the launcher made it)."""

    def __init__(self, directory: str | os.PathLike[str] | None, prefix: str) -> None:
        self._made_directory = directory is None
        #: the launcher's own files (data, logs)
        self.directory = Path(tempfile.mkdtemp(prefix=prefix) if directory is None else directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    @abstractmethod
    def running(self) -> bool:
        """Whether it was started and not stopped (a process may have died since)."""

    @abstractmethod
    def start(self) -> None:
        """Start and wait until it serves."""

    @abstractmethod
    def stop(self) -> None:
        """Kill what runs (a crash), keeping the files for the next :meth:`start`."""

    def close(self) -> None:
        """Stop, and remove :attr:`directory` if the launcher made it."""
        self.stop()
        if self._made_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self: _L) -> _L:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


_L = TypeVar("_L", bound=Launcher)


class _Owned(Launcher):
    """The lifecycle both servers share: a port, a directory and one process."""

    process: subprocess.Popen[bytes] | None
    #: seconds :meth:`start` waits for the server to serve
    start_timeout: float

    def __init__(self, directory: str | os.PathLike[str] | None, prefix: str) -> None:
        super().__init__(directory, prefix)
        #: the listening port, the same across restarts
        self.port = free_port()
        self.process = None

    @property
    def running(self) -> bool:
        """Whether the server process was started and not stopped (it may have died since)."""
        return self.process is not None

    def _wait_ready(self, ready: Callable[[], bool], name: str, interval: float) -> None:
        """After spawning: wait for ``ready()``, or stop the process and raise."""
        try:
            wait_until(
                ready,
                timeout=self.start_timeout,
                what=f"{name} on port {self.port}",
                process=self.process,
                interval=interval,
            )
        except BaseException:
            self.stop()
            raise


class RedisServer(_Owned):
    """A ``redis-server`` process we own: :meth:`stop` kills it, :meth:`start` brings it back on
    the same port and directory.

    ``settings`` are ``--name value...`` arguments (a tuple for several values); the defaults keep
    nothing on disk (``save ""``, ``appendonly no``). ``binary`` defaults to ``redis-server`` on
    ``PATH``. Constructing does not start it: :meth:`start` or ``with`` does.
    """

    def __init__(
        self,
        settings: Mapping[str, str | Sequence[str]] | None = None,
        *,
        binary: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise ServerUnavailableError("redis-server is not on PATH")
        #: the ``redis-server`` executable
        self.binary = found
        self.settings: dict[str, str | Sequence[str]] = {
            "save": "",
            "appendonly": "no",
            **(settings or {}),
        }
        self.start_timeout = start_timeout
        super().__init__(directory, "resilient-grpc-redis-")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        arguments = [self.binary, "--bind", HOST, "--port", str(self.port)]
        arguments += ["--dir", str(self.directory)]
        for name, value in self.settings.items():
            arguments += [f"--{name}", *((value,) if isinstance(value, str) else value)]
        self.process = subprocess.Popen(
            arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready(self.ping, "redis-server", 0.02)

    def ping(self) -> bool:
        """Whether the server answers ``PING`` now (a raw RESP exchange: no client library)."""
        with socket.create_connection((HOST, self.port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        """SIGKILL the server (a crash: no shutdown save) and reap it."""
        _kill(self.process)
        self.process = None

    def __enter__(self) -> RedisServer:
        super().__enter__()
        return self


def postgres_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: ``PATH`` first, then Debian's
    ``/usr/lib/postgresql/<newest>/bin``; ``None`` if neither has them."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: [int(part) if part.isdigit() else 0 for part in Path(path).parts],
        reverse=True,
    )
    return Path(candidates[0]).parent if candidates else None


def _clean_env() -> dict[str, str]:
    """The environment without ``PG*``, ``LC_*`` and ``LANG`` (they change what initdb does)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PG", "LC_")) and name != "LANG"
    }


class PostgresServer(_Owned):
    """A throwaway PostgreSQL cluster we own: ``initdb`` on construction, :meth:`start` runs the
    postmaster, :meth:`stop` crashes it (postmaster and every backend), :meth:`start` again
    recovers the same data on the same port.

    ``settings`` are extra ``-c name=value`` server settings; the defaults listen on 127.0.0.1
    only, use the server directory as socket directory (so a system server's socket is never
    touched), turn ``fsync`` off (harmless for process crashes, wrong for power-loss tests) and
    allow 200 connections. Authentication is ``trust`` for the ``postgres`` user.
    """

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        *,
        binaries: str | os.PathLike[str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        found = Path(binaries) if binaries is not None else postgres_binaries()
        if found is None:
            raise ServerUnavailableError("PostgreSQL binaries (initdb, postgres) are missing")
        self._user: str | None = None
        self._uid = self._gid = -1
        if os.geteuid() == 0:  # initdb refuses root: run as the postgres user
            import pwd

            try:
                postgres = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerUnavailableError(
                    "running as root, and there is no postgres user to run initdb as"
                ) from None
            self._user, self._uid, self._gid = "postgres", postgres.pw_uid, postgres.pw_gid
        #: the directory of ``initdb`` and ``postgres``
        self.binaries = found
        self.settings: dict[str, str] = {
            "listen_addresses": HOST,
            "fsync": "off",
            "max_connections": "200",
            **(settings or {}),
        }
        self.start_timeout = start_timeout
        super().__init__(directory, "resilient-grpc-postgres-")
        #: the data directory (inside :attr:`directory`)
        self.data = self.directory / "data"
        if self._user is not None:
            os.chown(self.directory, self._uid, self._gid)
        arguments = [
            str(found / "initdb"),
            *("-D", str(self.data), "-U", "postgres", "--locale=C", "-E", "UTF8"),
            *("--auth=trust", "--no-sync"),
        ]
        for attempt in range(2):
            completed = subprocess.run(
                arguments,
                user=self._user,
                env=_clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=self.directory,
            )
            if completed.returncode == 0:
                break
            if completed.returncode < 0 and attempt == 0:
                # initdb killed by a signal (seen once in CI: SIGSEGV, on a busy machine, while
                # the same binary passed before and after): once more, from an empty directory.
                shutil.rmtree(self.data, ignore_errors=True)
                continue
            self.close()  # removes the directory if it made it
            raise subprocess.CalledProcessError(
                completed.returncode, arguments, stderr=completed.stderr
            )

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres``."""
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def start(self) -> None:
        """Start the postmaster (logging to ``postgres.log``) and wait until it accepts connections."""
        arguments = [str(self.binaries / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        arguments += ["-k", str(self.directory)]
        for name, value in self.settings.items():
            arguments += ["-c", f"{name}={value}"]
        log = os.open(self.directory / "postgres.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            self.process = subprocess.Popen(
                arguments,
                env=_clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.directory,
                start_new_session=True,
                user=self._user,
            )
        finally:
            os.close(log)
        if self._user is not None:
            with contextlib.suppress(OSError):
                os.chown(self.directory / "postgres.log", self._uid, self._gid)
        self._wait_ready(self.ready, "postgres", 0.05)

    def ready(self) -> bool:
        """Whether the postmaster accepts connections now: the status line of its
        ``postmaster.pid`` says ``ready`` (no client library or ``pg_isready`` needed)."""
        lines = (self.data / "postmaster.pid").read_text().splitlines()
        return len(lines) > 7 and lines[7].strip() == "ready"

    def stop(self) -> None:
        """Crash the server: SIGSTOP the postmaster, SIGKILL it and every backend, reap them.

        The next :meth:`start` recovers the data (crash recovery), on the same port.
        """
        if self.process is None:
            return
        postmaster = _postmaster_pid(self.data)
        if postmaster is not None:
            children = _children(postmaster)
            _signal(postmaster, signal.SIGSTOP)  # no new backends from here on
            children = sorted(set(children) | set(_children(postmaster)))
            for pid in [postmaster, *children]:
                _signal(pid, signal.SIGKILL)
        _kill(self.process)
        self.process = None
        deadline = time.monotonic() + 10
        while postmaster is not None and _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.01)
        # orphaned backends may linger as zombies, which a new postmaster takes for live owners
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        (self.directory / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def __enter__(self) -> PostgresServer:
        super().__enter__()
        return self


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
