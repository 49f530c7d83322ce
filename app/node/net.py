"""Small network helpers shared by the node, the demo and the tests: free ports, C-ECHO,
waiting for peers, and the binding of calling AE titles to TLS client certificates."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from app.config import AllowedPeer


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it; bind soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def echo(host: str, port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout_s: float = 5.0,
         tls_context=None) -> int | None:
    """C-ECHO the peer (over TLS with ``tls_context``); returns its status (0 is success) or
    None when no association."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=called_ae,
                         tls_args=(tls_context, host) if tls_context is not None else None)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release()


def wait_for_echo(host: str, port: int, called_ae: str, timeout_s: float, calling_ae: str = "ECHOSCU",
                  alive: Callable[[], bool] | None = None) -> bool:
    """Poll with C-ECHO until the peer answers success, ``timeout_s`` passes (s), or
    ``alive()`` says the peer's process has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        if echo(host, port, called_ae, calling_ae, timeout_s=2.0) == 0:
            return True
        time.sleep(0.2)
    return False


# ---- TLS client certificates bound to AE titles ---------------------------------------------


@dataclass(frozen=True)
class PeerCertificate:
    """What identifies a TLS peer's certificate: its subject's common name and the SHA-256 of
    its DER encoding (lower-case hex)."""

    common_name: str
    sha256: str

    @classmethod
    def of(cls, sock: object) -> "PeerCertificate | None":
        """The certificate the peer presented on ``sock`` (an SSLSocket after its handshake),
        or None (no TLS, no certificate)."""
        if not isinstance(sock, ssl.SSLSocket):
            return None
        try:
            der = sock.getpeercert(binary_form=True)
            decoded = sock.getpeercert() or {}
        except (ValueError, OSError):  # handshake not done, socket closed
            return None
        if not der:
            return None
        names = [v for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"]
        return cls(names[0] if names else "", hashlib.sha256(der).hexdigest())


def _fingerprint(text: str) -> str:
    return text.replace(":", "").replace(" ", "").strip().lower()


def _matches(peer: AllowedPeer, cert: PeerCertificate) -> bool:
    return ((not peer.tls_subject_cn or cert.common_name == peer.tls_subject_cn.strip())
            and (not peer.tls_sha256 or cert.sha256 == _fingerprint(peer.tls_sha256)))


def certificate_binding_refusal(peers: Sequence[AllowedPeer], calling_ae: str,
                                cert: PeerCertificate | None) -> str | None:
    """Why an association must be refused because its calling AE title and its TLS client
    certificate do not belong together, or None when they do (or nothing is bound).

    A calling AE title with bound entries (``tls_subject_cn``/``tls_sha256``) needs a
    certificate matching one of them; a certificate matching some entry may be used only by
    that entry's AE title (so a trusted modality cannot present itself as another allowed
    peer). Entries are compared by AE title; their ``host`` is checked by the allow-list."""
    calling_ae = calling_ae.strip()
    bound = [p for p in peers if p.tls_bound]
    if not bound:
        return None
    own = [p for p in bound if p.ae_title.strip() == calling_ae]
    shown = f"CN={cert.common_name!r}, SHA-256 {cert.sha256[:16]}..." if cert else "no client certificate"
    if own:
        if cert is None or not any(_matches(p, cert) for p in own):
            return f"client certificate ({shown}) is not the one bound to calling AE title {calling_ae}"
        return None
    owners = sorted({p.ae_title.strip() for p in bound if cert is not None and _matches(p, cert)})
    if owners:
        return f"client certificate ({shown}) is bound to AE title {', '.join(owners)}, not {calling_ae}"
    return None
