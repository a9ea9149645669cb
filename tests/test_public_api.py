"""The public import surface as users write it (issue 9, item 9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.child_process import REPO, run_module


def test_the_aio_subpackage_is_reachable_as_an_attribute() -> None:
    # a fresh interpreter: nothing imported resilient_grpc.aio before
    code = textwrap.dedent(
        """
        import resilient_grpc
        channel = resilient_grpc.aio.resilient_channel("127.0.0.1:1")
        assert type(channel).__module__ == "resilient_grpc.aio.client"
        assert resilient_grpc.aio.DedupInterceptor.__name__ == "DedupInterceptor"
        assert "aio" in dir(resilient_grpc)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_an_unknown_name_is_an_attribute_error() -> None:
    import resilient_grpc

    with pytest.raises(AttributeError, match="RetryPolicyy"):
        resilient_grpc.RetryPolicyy  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.timeout(180)
def test_mypy_strict_catches_typos_and_accepts_what_the_runtime_accepts(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(
        textwrap.dedent(
            """
            import grpc
            import resilient_grpc

            policy = resilient_grpc.RetryPolicy(
                retryable_codes={grpc.StatusCode.UNAVAILABLE, "ABORTED", 14},
                idempotent_methods={"/ledger.v1.Ledger/GetBalance"},
            )
            only = resilient_grpc.RetryPolicy(retryable_codes={grpc.StatusCode.UNAVAILABLE})
            channel = resilient_grpc.aio.resilient_channel("127.0.0.1:1", retry=policy)
            breaker = resilient_grpc.CircuitBreaker(codes=[grpc.StatusCode.INTERNAL])
            sync = resilient_grpc.resilient_channel("127.0.0.1:1", breaker=breaker)
            """
        )
    )
    bad = tmp_path / "bad.py"
    bad.write_text("import resilient_grpc\n\nresilient_grpc.RetryPolicyy()\n")
    completed = run_module(
        "mypy",
        "--strict",
        "--no-error-summary",
        "--cache-dir",
        str(tmp_path / "cache"),
        str(good),
        str(bad),
        timeout=170,
    )
    errors = completed.stdout.strip().splitlines()
    assert len(errors) == 1, completed.stdout + completed.stderr
    assert "bad.py:3" in errors[0] and 'no attribute "RetryPolicyy"' in errors[0]
