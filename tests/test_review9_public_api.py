"""Adversarial review 9: the public API as a user's type checker and interpreter see it (item 9).

The lazy loading must hide nothing from ``mypy --strict`` in the ``aio`` subpackage either
(a typo there, or a wrong argument type, is an error, not an ``Any``), and every exported name
must resolve at run time in a fresh interpreter, warnings as errors.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.child_process import REPO, run_module


def test_every_exported_name_resolves_in_a_fresh_interpreter() -> None:
    code = textwrap.dedent(
        """
        from resilient_grpc import *  # noqa: F403
        import resilient_grpc
        assert resilient_grpc.aio.resilient_channel.__module__ == "resilient_grpc.aio.client"
        import resilient_grpc.aio as aio
        for module in (resilient_grpc, aio):
            for name in module.__all__:
                getattr(module, name)
                assert name in dir(module), name
        for module, typo in ((resilient_grpc, "RetryPolicyy"), (aio, "resilient_channell")):
            try:
                getattr(module, typo)
            except AttributeError:
                pass
            else:
                raise AssertionError(typo)
        """
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, cwd=REPO, timeout=60)


USER_CODE = """\
import grpc
import resilient_grpc
import resilient_grpc.aio as rga
from resilient_grpc.aio import resilient_channell

resilient_grpc.aio.resilient_channell("127.0.0.1:1")
resilient_grpc.RetryPolicy(max_attempts="3")
resilient_grpc.aio.resilient_channel(1)
rga.DedupInterceptor(42)
wrong: int = resilient_grpc.aio.resilient_channel("127.0.0.1:1")
policy = resilient_grpc.RetryPolicy(
    retryable_codes=(grpc.StatusCode.UNAVAILABLE, "aborted", 14),
    idempotent_methods=("/a/b",),
)
hedge = resilient_grpc.HedgingPolicy(non_fatal_codes={grpc.StatusCode.UNAVAILABLE}, methods=["/a/b"])
breaker = resilient_grpc.CircuitBreaker(codes=frozenset({grpc.StatusCode.INTERNAL}))


async def main() -> None:
    async with resilient_grpc.aio.resilient_channel(
        "127.0.0.1:1", retry=policy, hedging=hedge, breaker=breaker
    ) as channel:
        await channel.channel_ready()
"""
#: (line, what mypy must say there): one error per line, nothing else.
EXPECTED = [
    (4, 'has no attribute "resilient_channell"'),
    (6, 'has no attribute "resilient_channell"'),
    (7, '"max_attempts" to "RetryPolicy" has incompatible type "str"'),
    (8, 'to "resilient_channel" has incompatible type "int"'),
    (9, 'to "DedupInterceptor" has incompatible type "int"'),
    (10, 'expression has type "Channel", variable has type "int"'),
]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mypy_strict_sees_real_types_through_the_aio_subpackage(tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    completed = run_module(
        "mypy",
        "--strict",
        "--no-error-summary",
        "--cache-dir",
        str(tmp_path / "cache"),
        str(user),
        timeout=170,
    )
    errors = completed.stdout.strip().splitlines()
    assert len(errors) == len(EXPECTED), completed.stdout + completed.stderr
    for error, (line, message) in zip(errors, EXPECTED, strict=True):
        assert f"user.py:{line}:" in error and message in error, error
