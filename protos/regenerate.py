"""Regenerate ``protos/ledger_pb2*.py`` from ``protos/ledger.proto`` with grpcio-tools.

Run from anywhere: ``python -m protos.regenerate`` (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("ledger_pb2.py", "ledger_pb2.pyi", "ledger_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc with the repository root as include path, so imports read ``protos.ledger_pb2``."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "protos" / "ledger.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


_VERSION_LINE = re.compile(
    r"(GRPC_GENERATED_VERSION = |# Protobuf Python Version: |_runtime_version\.ValidateProtobufRuntimeVersion\()"
)
_VERSION_CALL = re.compile(
    r"^\s+_runtime_version\.Domain\.PUBLIC,\n(\s+\d+,\n){3}\s+'[^']*',\n", re.M
)


def _normalized(text: str) -> str:
    """Drop the generator-version stamps, so a newer grpcio-tools is not 'stale'."""
    text = _VERSION_CALL.sub("", text)
    return "\n".join(line for line in text.splitlines() if not _VERSION_LINE.search(line))


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in GENERATED:
            fresh = (Path(tmp) / "protos" / name).read_text()
            committed = ROOT / "protos" / name
            if not committed.exists() or _normalized(committed.read_text()) != _normalized(fresh):
                stale.append(name)
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed files are stale"
    )
    ns = parser.parse_args()
    if ns.check:
        stale = stale_files()
        if stale:
            print("stale generated files:", ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
