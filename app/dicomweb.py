"""DICOMweb with ``dicomweb-client``: a client per configured service, and STOW-RS of result files.

Used by the node's sender (a ``kind: dicomweb`` destination in the outbox) and by
``python -m app reanalyse`` (QIDO-RS / WADO-RS source, STOW-RS output). Credentials are read
from their files at each client creation, so a rotated token needs no restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pydicom
import requests

from app.config import DicomwebDestination

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

#: Files per STOW-RS request: a study's results (SEG, SRs, PDF) fit in one; bounds request size.
STOW_BATCH = 16
#: STOW-RS per-instance statuses after which the archive holds the object (success, warnings).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def request_headers(service: DicomwebDestination) -> dict[str, str]:
    """HTTP headers carrying the service's credential (none when it has none)."""
    if service.token_file:
        return {"Authorization": f"Bearer {Path(service.token_file).read_text().strip()}"}
    if service.auth_header_file:
        line = Path(service.auth_header_file).read_text().strip().splitlines()[0]
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"{service.auth_header_file}: expected one line 'Header-Name: value'")
        return {name.strip(): value.strip()}
    return {}


def make_client(service: DicomwebDestination) -> "DICOMwebClient":
    """A ``DICOMwebClient`` for the service: its credential header, its CA bundle, its timeout."""
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    if service.ca_bundle:
        session.verify = str(service.ca_bundle)
    return DICOMwebClient(service.url.rstrip("/"), session=session, headers=request_headers(service),
                          timeout=service.timeout_s)


def _statuses(response: pydicom.Dataset) -> dict[str, int]:
    """SOP Instance UID -> status from a STOW-RS response (PS3.18 10.5.3: ReferencedSOPSequence
    with an optional WarningReason, FailedSOPSequence with a FailureReason)."""
    statuses: dict[str, int] = {}
    for item in response.get("ReferencedSOPSequence", []):
        statuses[str(item.ReferencedSOPInstanceUID)] = int(item.get("WarningReason", 0x0000))
    for item in response.get("FailedSOPSequence", []):
        statuses[str(item.ReferencedSOPInstanceUID)] = int(item.get("FailureReason", 0xC000))
    return statuses


def stow_files(paths: Sequence[Path], service: DicomwebDestination) -> list[tuple[Path, int | None, str]]:
    """STOW-RS files to the service, ``STOW_BATCH`` per request.

    Returns one ``(path, status, note)`` per file, as :func:`app.node.sender.store_files` does:
    ``status`` is the instance's status in the STOW-RS response (0x0000 stored, 0xB0xx stored
    with a warning, else failed), or None when the request failed as a whole (service down,
    HTTP error, unreadable file); ``note`` says why in words.
    """
    results: list[tuple[Path, int | None, str]] = []
    try:
        client = make_client(service)
    except (OSError, ValueError) as exc:  # credential file missing or malformed
        return [(Path(p), None, f"credential: {type(exc).__name__}: {exc}") for p in paths]
    for start in range(0, len(paths), STOW_BATCH):
        batch = [Path(p) for p in paths[start:start + STOW_BATCH]]
        datasets, readable = [], []
        for path in batch:
            try:
                datasets.append(pydicom.dcmread(path))
                readable.append(path)
            except Exception as exc:
                results.append((path, None, f"unreadable file: {type(exc).__name__}: {exc}"))
        if not datasets:
            continue
        try:
            response = client.store_instances(datasets)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            results.extend((p, None, f"HTTP {code} from STOW-RS") for p in readable)
            continue
        except (requests.RequestException, OSError) as exc:  # refused, reset, timeout, TLS
            results.extend((p, None, f"{type(exc).__name__}: {str(exc)[:300]}") for p in readable)
            continue
        statuses = _statuses(response)
        for path, ds in zip(readable, datasets):
            uid = str(ds.SOPInstanceUID)
            if not statuses:  # HTTP 200 with an empty body: the whole request was accepted
                results.append((path, 0x0000, "HTTP 200, empty STOW-RS response"))
            elif uid in statuses:
                results.append((path, statuses[uid], ""))
            else:
                results.append((path, None, "instance missing from the STOW-RS response"))
    return results
