"""The committed demo modules match protos/ledger.proto."""

from protos.regenerate import stale_files


def test_generated_modules_are_current() -> None:
    assert stale_files() == [], "run `python -m protos.regenerate` and commit the result"
