"""Small network helpers shared by the demo and the tests: free ports, C-ECHO, waiting for peers."""

from __future__ import annotations

import socket
import time
from typing import Callable

from pynetdicom import AE
from pynetdicom.sop_class import Verification


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
