"""A throwaway PKI for DICOM TLS tests, made with the ``openssl`` command line.

:func:`make_pki` writes, under one folder: a test CA, a server certificate for 127.0.0.1
(subjectAltName IP:127.0.0.1 and DNS:localhost) and a client certificate, both signed by
that CA, plus a second, untrusted CA with its own client certificate (a peer the node must
turn away). Keys are unencrypted EC P-256; certificates are valid for two days.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {run.stderr}")


def _key(path: Path, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=cwd)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _key(key, folder)
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str, san: str | None) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem",
                           folder / f"{name}.ext")
    _key(key, folder)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=folder)
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyAgreement",
             f"extendedKeyUsage={usage}"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=folder)
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Create the CA, server, client and rogue certificates under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    server = _leaf(folder, "node-server", ca, "serverAuth,clientAuth", "IP:127.0.0.1,DNS:localhost")
    client = _leaf(folder, "scanner-client", ca, "clientAuth,serverAuth", "IP:127.0.0.1,DNS:localhost")
    rogue_ca = _ca(folder, "rogue-ca")
    rogue = _leaf(folder, "rogue-client", rogue_ca, "clientAuth", None)
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue_ca[0], rogue[0], rogue[1])
