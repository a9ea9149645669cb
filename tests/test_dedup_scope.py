"""Who shares a record: tenants over real mutual TLS never see each other's answers by default, a
key is bound to one method, and requests are compared by content (protobuf maps in any order),
on the sync and the aio server.

Certificates are made for each test with the ``openssl`` command (a CA, a server certificate for
127.0.0.1, one client certificate per tenant).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, AioLedger, SyncLedger, serve, serve_aio
from resilient_grpc import SHARED_SCOPE, peer_identity
from resilient_grpc.aio import DedupInterceptor as AioDedupInterceptor
from resilient_grpc.core.dedup import request_fingerprint
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore
from tests.dedup_fixtures import KEY, transfer
from tests.tls_certs import CertificateAuthority, Pair

REPLAYED = ("idempotency-replayed", "true")
TENANTS = ("alice", "bob")


class Certificates:
    def __init__(self, directory: Path) -> None:
        try:
            self.ca = CertificateAuthority(directory)
        except FileNotFoundError:
            pytest.skip("needs the openssl command to make test certificates")
        self.server = self.ca.issue(
            "server", common_name="127.0.0.1", san="IP:127.0.0.1", usage="serverAuth"
        )
        self.clients: dict[str, Pair] = {
            name: self.ca.issue(
                name, common_name=name, san=f"DNS:{name}.tenants.example", usage="clientAuth"
            )
            for name in TENANTS
        }

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.server.key, self.server.cert)],
            root_certificates=self.ca.cert,
            require_client_auth=True,
        )

    def channel_credentials(self, tenant: str) -> grpc.ChannelCredentials:
        pair = self.clients[tenant]
        return grpc.ssl_channel_credentials(self.ca.cert, pair.key, pair.cert)


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


def _keyed(key: str) -> list[tuple[str, str]]:
    return [(KEY, key)]


# ---------------------------------------------------------------- tenants over mutual TLS


def test_tenants_sending_the_same_key_and_bytes_each_execute_once_sync(
    certificates: Certificates,
) -> None:
    servicer = SyncLedger()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[DedupInterceptor(MemoryStore())],  # scope=None: the default
    )
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", certificates.server_credentials())
    server.start()
    channels = {
        name: grpc.secure_channel(f"127.0.0.1:{port}", certificates.channel_credentials(name))
        for name in TENANTS
    }
    try:
        first: dict[str, ledger_pb2.TransferReply] = {}
        for name in TENANTS:
            stub = ledger_pb2_grpc.LedgerStub(channels[name])
            reply, call = stub.Transfer.with_call(
                transfer(), metadata=_keyed("order-1"), timeout=10
            )
            assert REPLAYED not in tuple(call.trailing_metadata()), f"{name} got a replay"
            first[name] = reply
        assert first["alice"].transfer_id != first["bob"].transfer_id
        for name in TENANTS:  # each tenant's retry replays its own answer
            stub = ledger_pb2_grpc.LedgerStub(channels[name])
            again, call = stub.Transfer.with_call(
                transfer(), metadata=_keyed("order-1"), timeout=10
            )
            assert again == first[name]
            assert REPLAYED in tuple(call.trailing_metadata())
        assert servicer.state.executions["order-1"] == 2
    finally:
        for channel in channels.values():
            channel.close()
        server.stop(None)


async def test_tenants_sending_the_same_key_and_bytes_each_execute_once_aio(
    certificates: Certificates,
) -> None:
    servicer = AioLedger()
    server = grpc.aio.server(interceptors=[AioDedupInterceptor(MemoryStore())])
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", certificates.server_credentials())
    await server.start()
    channels = {
        name: grpc.aio.secure_channel(f"127.0.0.1:{port}", certificates.channel_credentials(name))
        for name in TENANTS
    }
    try:
        first: dict[str, ledger_pb2.TransferReply] = {}
        for round_ in range(2):
            for name in TENANTS:
                call = ledger_pb2_grpc.LedgerStub(channels[name]).Transfer(
                    transfer(), metadata=_keyed("order-1"), timeout=10
                )
                reply = await call
                replayed = REPLAYED in tuple(await call.trailing_metadata() or ())
                if round_ == 0:
                    assert not replayed, f"{name} got a replay"
                    first[name] = reply
                else:
                    assert replayed and reply == first[name]
        assert first["alice"].transfer_id != first["bob"].transfer_id
        assert servicer.state.executions["order-1"] == 2
    finally:
        for channel in channels.values():
            await channel.close()
        await server.stop(None)


class _Context:
    """Just what :func:`peer_identity` reads."""

    def __init__(self, key: str | None, identities: list[bytes] | None) -> None:
        self._key, self._identities = key, identities

    def peer_identity_key(self) -> str | None:
        return self._key

    def peer_identities(self) -> list[bytes] | None:
        return self._identities


def test_peer_identity_is_the_authenticated_names_or_nothing() -> None:
    san = "x509_subject_alternative_name"
    assert peer_identity(_Context(None, None)) == ""
    alice = peer_identity(_Context(san, [b"alice.example"]))
    assert alice and "alice.example" in alice
    assert alice != peer_identity(_Context(san, [b"bob.example"]))
    assert alice != peer_identity(_Context("x509_common_name", [b"alice.example"]))
    assert peer_identity(_Context(san, [b"a", b"b"])) != peer_identity(_Context(san, [b"a\x00b"]))


# ---------------------------------------------------------------- the construction warning


def _scope_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "resilient_grpc.server" and record.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("interceptor", [DedupInterceptor, AioDedupInterceptor])
def test_scope_none_warns_once_at_construction_and_an_explicit_scope_does_not(
    interceptor: type[DedupInterceptor], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_grpc.server")
    interceptor()
    (warning,) = _scope_warnings(caplog)
    assert "share one key space" in warning and "SHARED_SCOPE" in warning
    caplog.clear()
    interceptor(scope=SHARED_SCOPE)
    interceptor(scope=peer_identity)
    interceptor(scope=lambda context: "tenant")
    assert _scope_warnings(caplog) == []


# ---------------------------------------------------------------- one key, one method


@pytest.fixture
def sync_stub() -> Iterator[tuple[SyncLedger, ledger_pb2_grpc.LedgerStub]]:
    server, port, servicer = serve(interceptors=[DedupInterceptor(scope=SHARED_SCOPE)])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, ledger_pb2_grpc.LedgerStub(channel)
    channel.close()
    server.stop(None)


@pytest.fixture
async def aio_stub() -> AsyncIterator[tuple[AioLedger, ledger_pb2_grpc.LedgerStub]]:
    server, port, servicer = await serve_aio(interceptors=[AioDedupInterceptor(scope=SHARED_SCOPE)])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, ledger_pb2_grpc.LedgerStub(channel)
    await channel.close()
    await server.stop(None)


def test_a_key_reused_on_another_method_is_refused_sync(
    sync_stub: tuple[SyncLedger, ledger_pb2_grpc.LedgerStub],
) -> None:
    servicer, stub = sync_stub
    stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetBalance(ledger_pb2.BalanceRequest(account="a"), metadata=_keyed("k1"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another method" in (refused.value.details() or "")
    assert servicer.state.calls_to(GET_BALANCE) == []
    assert len(servicer.state.calls_to(TRANSFER)) == 1


async def test_a_key_reused_on_another_method_is_refused_aio(
    aio_stub: tuple[AioLedger, ledger_pb2_grpc.LedgerStub],
) -> None:
    servicer, stub = aio_stub
    await stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetBalance(
            ledger_pb2.BalanceRequest(account="a"), metadata=_keyed("k1"), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another method" in (refused.value.details() or "")
    assert servicer.state.calls_to(GET_BALANCE) == []


# ---------------------------------------------------------------- canonical request fingerprint

PUT = "/test.Maps/Put"


def _struct(*items: tuple[str, str]) -> bytes:
    """A Struct's wire bytes with its map entries in exactly this order (messages concatenate)."""
    parts = []
    for name, value in items:
        message = struct_pb2.Struct()
        message.fields[name].string_value = value
        parts.append(message.SerializeToString())
    return b"".join(parts)


A_THEN_B = _struct(("a", "1"), ("b", "2"))
B_THEN_A = _struct(("b", "2"), ("a", "1"))
OTHER = _struct(("a", "1"), ("b", "3"))


def test_equal_protobuf_requests_share_a_fingerprint_whatever_their_map_order() -> None:
    assert A_THEN_B != B_THEN_A
    first, second = (struct_pb2.Struct.FromString(raw) for raw in (A_THEN_B, B_THEN_A))
    assert first == second
    assert request_fingerprint(PUT, first, A_THEN_B) == request_fingerprint(PUT, second, B_THEN_A)
    other = struct_pb2.Struct.FromString(OTHER)
    assert request_fingerprint(PUT, first, A_THEN_B) != request_fingerprint(PUT, other, OTHER)
    assert request_fingerprint(PUT, first, A_THEN_B) != request_fingerprint(
        "/x.Y/Z", first, A_THEN_B
    )
    # anything that is not a protobuf message is fingerprinted by its raw bytes
    assert request_fingerprint(PUT, {"a": 1}, b"raw") == request_fingerprint(PUT, b"raw", b"raw")
    assert request_fingerprint(PUT, b"raw", b"raw") != request_fingerprint(PUT, b"raw2", b"raw2")


class Puts:
    def __init__(self) -> None:
        self.executions = 0

    def reply(self, request: struct_pb2.Struct) -> struct_pb2.Value:
        self.executions += 1
        return struct_pb2.Value(string_value=f"put {len(request.fields)} #{self.executions}")


def _handler(puts: Puts, aio: bool) -> grpc.GenericRpcHandler:
    def put(request: struct_pb2.Struct, context: Any) -> struct_pb2.Value:
        return puts.reply(request)

    async def put_aio(request: struct_pb2.Struct, context: Any) -> struct_pb2.Value:
        return puts.reply(request)

    return grpc.method_handlers_generic_handler(
        "test.Maps",
        {
            "Put": grpc.unary_unary_rpc_method_handler(
                put_aio if aio else put,
                request_deserializer=struct_pb2.Struct.FromString,
                response_serializer=struct_pb2.Value.SerializeToString,
            )
        },
    )


def test_a_rebuilt_equal_request_is_replayed_not_refused_sync() -> None:
    puts = Puts()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[DedupInterceptor(scope=SHARED_SCOPE)],
    )
    server.add_generic_rpc_handlers([_handler(puts, aio=False)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            put = channel.unary_unary(PUT)  # raw bytes in and out
            first = put(A_THEN_B, metadata=_keyed("m1"), timeout=10)
            again, call = put.with_call(B_THEN_A, metadata=_keyed("m1"), timeout=10)
            assert again == first and REPLAYED in tuple(call.trailing_metadata())
            with pytest.raises(grpc.RpcError) as refused:
                put(OTHER, metadata=_keyed("m1"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as garbage:
                put(b"\xff\xff\xff", metadata=_keyed("m2"), timeout=10)
            assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert garbage.value.details() == (
                "the request could not be deserialized; nothing was executed"
            )
        assert puts.executions == 1
    finally:
        server.stop(None)


async def test_a_rebuilt_equal_request_is_replayed_not_refused_aio() -> None:
    puts = Puts()
    server = grpc.aio.server(interceptors=[AioDedupInterceptor(scope=SHARED_SCOPE)])
    server.add_generic_rpc_handlers([_handler(puts, aio=True)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            put = channel.unary_unary(PUT)
            first = await put(A_THEN_B, metadata=_keyed("m1"), timeout=10)
            call = put(B_THEN_A, metadata=_keyed("m1"), timeout=10)
            assert await call == first
            assert REPLAYED in tuple(await call.trailing_metadata() or ())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await put(OTHER, metadata=_keyed("m1"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as garbage:
                await put(b"\xff\xff\xff", metadata=_keyed("m2"), timeout=10)
            assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert puts.executions == 1
    finally:
        await server.stop(None)
