"""Test certificates made with the openssl command: a CA, a server certificate for IP 127.0.0.1,
and client certificates, one per tenant (CN and a DNS subjectAltName)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pair:
    key: bytes
    cert: bytes


class CertificateAuthority:
    """A throwaway certificate authority in ``directory``."""

    def __init__(self, directory: Path, openssl: str | None = None) -> None:
        found = openssl or shutil.which("openssl")
        if found is None:
            raise FileNotFoundError("openssl")
        self.openssl = found
        self.directory = directory
        self.key = directory / "ca.key"
        self.cert_path = directory / "ca.pem"
        self._run(
            "req", "-x509", *_EC, "-keyout", str(self.key), "-out", str(self.cert_path),
            "-days", "1", "-subj", "/CN=resilient-grpc test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        self.cert = self.cert_path.read_bytes()

    def _run(self, *args: str) -> None:
        subprocess.run([self.openssl, *args], check=True, capture_output=True, timeout=30)

    def issue(self, name: str, *, common_name: str, san: str, usage: str) -> Pair:
        """A key and a certificate signed by this CA (``san``: e.g. ``IP:127.0.0.1``)."""
        key, csr, cert = (self.directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        self._run("req", *_EC, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert_path), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(extensions),
        )  # fmt: skip
        return Pair(key.read_bytes(), cert.read_bytes())
