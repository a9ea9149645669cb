"""resilient_grpc.testing.servers: a private redis-server and PostgreSQL start on a free loopback
port, a crash (stop) and a restart keep the port, a missing binary is ServerUnavailableError, and a
server that dies while starting is reported at once, not after the start timeout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from resilient_grpc.testing.servers import (
    PostgresServer,
    RedisServer,
    ServerUnavailableError,
    postgres_binaries,
    wait_until,
)
from tests.private_servers import ExternalServer, unavailable


def _redis(directory: Path) -> RedisServer:
    try:
        return RedisServer(directory=directory)
    except ServerUnavailableError as error:
        unavailable("Redis", str(error))


def test_redis_server_crashes_and_restarts_on_its_port(tmp_path: Path) -> None:
    server = _redis(tmp_path / "redis")
    assert not server.running
    with pytest.raises(OSError):
        server.ping()
    with server:
        assert server.running and server.ping()
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        port = server.port
        server.stop()
        assert not server.running
        with pytest.raises(OSError):
            server.ping()
        server.start()
        assert server.port == port and server.ping()
    assert not server.running
    assert (tmp_path / "redis").is_dir(), "a directory the caller gave is the caller's to remove"


def test_a_directory_it_made_is_removed_on_close() -> None:
    try:
        server = RedisServer()
    except ServerUnavailableError as error:
        unavailable("Redis", str(error))
    with server:
        assert server.directory.is_dir()
    assert not server.directory.exists()


def test_a_missing_binary_is_server_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ServerUnavailableError, match="redis-server is not on PATH"):
        RedisServer()


def test_a_server_that_dies_while_starting_is_reported_at_once() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 3 before it was ready"):
        wait_until(lambda: False, timeout=30, what="the server", process=process)
    assert time.monotonic() - started < 10


def test_wait_until_gives_up_after_its_timeout() -> None:
    with pytest.raises(RuntimeError, match=r"the server was not ready within 0\.05 s"):
        wait_until(lambda: False, timeout=0.05, what="the server")


def test_postgres_server_crashes_and_recovers_its_data(
    postgres_server: PostgresServer | ExternalServer,
) -> None:
    if not isinstance(postgres_server, PostgresServer):
        pytest.skip("POSTGRES_URL: cannot stop that server")
    assert postgres_server.ready()
    import psycopg

    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS servers_test (n int)")
        connection.execute("INSERT INTO servers_test VALUES (7)")
    postgres_server.stop()
    assert not postgres_server.running
    postgres_server.start()
    with psycopg.connect(postgres_server.url, autocommit=True) as connection:
        rows = connection.execute("SELECT n FROM servers_test").fetchall()
        connection.execute("DROP TABLE servers_test")
    assert rows == [(7,)]


def test_an_initdb_killed_by_a_signal_is_run_once_more() -> None:
    """initdb died once in CI with SIGSEGV (the same binary passed before and after): the
    launcher runs it once more from an empty directory; a second crash is an error."""
    real = postgres_binaries()
    if real is None:
        unavailable("PostgreSQL", "initdb and postgres are not installed")
    # Readable and writable by the postgres user initdb runs as under root.
    fake = Path(tempfile.mkdtemp(prefix="fake-initdb-"))
    try:
        fake.chmod(0o777)
        marker = fake / "crashed"
        script = fake / "initdb"
        script.write_text(
            "#!/bin/sh\n"
            f'if [ ! -e "{marker}" ]; then touch "{marker}"; kill -SEGV $$; fi\n'
            f'exec "{real / "initdb"}" "$@"\n'
        )
        script.chmod(0o755)
        (fake / "postgres").symlink_to(real / "postgres")
        with PostgresServer(binaries=fake) as server:
            assert marker.exists()  # the first run crashed
            assert (server.data / "PG_VERSION").exists()  # the second made the cluster
        marker.unlink()
        script.write_text("#!/bin/sh\nkill -SEGV $$\n")
        with pytest.raises(subprocess.CalledProcessError):
            PostgresServer(binaries=fake)
    finally:
        shutil.rmtree(fake, ignore_errors=True)
