"""``resilient_channel(credentials=...)`` opens a secure channel (sync and aio), with the stack on it.

The server listens with TLS on 127.0.0.1 (a self-signed certificate made with the ``openssl``
command for the test). A plain channel cannot talk to it, so a call that succeeds proves the
credentials reached the underlying channel.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, AioLedger, SyncLedger
from resilient_grpc import IdempotencyKeys, RetryPolicy
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import resilient_channel
from tests.helpers import BALANCE_REQUEST

POLICY = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)

Tls = tuple[grpc.ServerCredentials, grpc.ChannelCredentials]


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    """Server and channel credentials for a self-signed certificate of IP 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    return server, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())


def test_sync_resilient_channel_with_credentials_is_secure_and_retries(tls: Tls) -> None:
    servicer = SyncLedger()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls[0])
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        # the server really requires TLS: a plain channel fails
        with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError):
            ledger_pb2_grpc.LedgerStub(plain).GetBalance(BALANCE_REQUEST, timeout=2)
        servicer.state.faults.fail_times(GET_BALANCE, 1)
        with resilient_channel(
            target,
            credentials=tls[1],
            options=[("grpc.max_receive_message_length", 1 << 20)],
            retry=POLICY,
            idempotency=IdempotencyKeys(),
        ) as channel:
            reply = ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=5)
        assert reply.balance == servicer.state.initial_balance
        calls = servicer.state.calls_to(GET_BALANCE)
        assert len(calls) == 2 and calls[0].key is not None and calls[0].key == calls[1].key
    finally:
        server.stop(None)


async def test_aio_resilient_channel_with_credentials_is_secure_and_retries(tls: Tls) -> None:
    servicer = AioLedger()
    server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls[0])
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await ledger_pb2_grpc.LedgerStub(plain).GetBalance(BALANCE_REQUEST, timeout=2)
        servicer.state.faults.fail_times(GET_BALANCE, 1)
        async with aio_resilient_channel(
            target,
            credentials=tls[1],
            retry=POLICY,
            idempotency=IdempotencyKeys(),
        ) as channel:
            reply = await ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=5)
        assert reply.balance == servicer.state.initial_balance
        calls = servicer.state.calls_to(GET_BALANCE)
        assert len(calls) == 2 and calls[0].key is not None and calls[0].key == calls[1].key
    finally:
        await server.stop(None)
