"""The storage SCU of the reliability tests, the soak run and the fuzzer: one implementation.

* :func:`send_files`: C-STORE files over one association (pynetdicom), one status per file,
  optionally exactly as the bytes are (``raw``: the fuzzer's mutated data sets) or over TLS;
* run as a program, the same in its own process, for senders that must really run side by side
  (pynetdicom associations driven from several threads of one process can lose a C-STORE
  response; separate processes, like separate modalities, do not share that state)::

    python -m reliability.scu --port 11112 --calling-ae SCU1 [--called-ae PARASPINAL] [--wait] FILE...

  It associates, prints ``ready`` (or ``refused``); with ``--wait`` it then waits for a line on
  stdin before sending (so a driver can open all associations first); then sends each file
  and prints one JSON line per file: ``{"path": ..., "status": 0 | <failure status> | null}``,
  and ``done``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config as pynetdicom_config

HOST = "127.0.0.1"
NODE_AE = "PARASPINAL"
#: pynetdicom proposes at most 128 presentation contexts per association.
MAX_CONTEXTS = 128


def contexts_of(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) of each file, from its file meta, in first-seen order."""
    contexts: list[tuple[str, str]] = []
    for path in paths:
        meta = read_file_meta_info(path)
        wanted = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if wanted not in contexts:
            contexts.append(wanted)
    return contexts


def storage_ae(calling_ae: str, contexts: Sequence[tuple[str, str]], timeout_s: float = 30.0) -> AE:
    """A pynetdicom AE proposing each (SOP class, transfer syntax) as its own context;
    ACSE, DIMSE and network timeouts ``timeout_s`` (s)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntax in list(contexts)[:MAX_CONTEXTS]:
        ae.add_requested_context(sop_class, [syntax])
    return ae


@contextlib.contextmanager
def raw_bytes() -> Iterator[None]:
    """Within: pynetdicom sends a file's data set bytes as they are, never decoded and
    re-encoded (a mutated data set reaches the peer exactly as mutated)."""
    old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old


def store_each(assoc, paths: Sequence[Path],
               on_ack: Callable[[Path, int | None], None] | None = None) -> list[tuple[Path, int | None]]:
    """C-STORE each file over ``assoc``; (path, status or None) per file. ``on_ack`` is called
    after each response (e.g. to kill the receiver half way)."""
    results: list[tuple[Path, int | None]] = []
    for path in paths:
        status: int | None = None
        if assoc.is_established:
            try:
                rsp = assoc.send_c_store(path)
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            except Exception:  # the association broke under us: no response for this file
                status = None
        results.append((path, status))
        if on_ack is not None:
            on_ack(path, status)
    return results


def send_files(paths: Sequence[Path], port: int, calling_ae: str, called_ae: str = NODE_AE, host: str = HOST,
               on_ack: Callable[[Path, int | None], None] | None = None, barrier: threading.Barrier | None = None,
               tls_args=None, raw: bool = False, timeout_s: float = 30.0) -> list[tuple[Path, int | None]]:
    """C-STORE ``paths`` over one association; returns (path, status or None) per file.

    ``barrier`` is waited on once the association is established (so several senders really
    overlap); ``tls_args`` as pynetdicom's (SSLContext, server host name); ``raw``: send the
    bytes as they are (:func:`raw_bytes`)."""
    ae = storage_ae(calling_ae, contexts_of(paths), timeout_s)
    with raw_bytes() if raw else contextlib.nullcontext():
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
        if barrier is not None:
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                pass
        if not assoc.is_established:
            return [(p, None) for p in paths]
        try:
            return store_each(assoc, paths, on_ack)
        finally:
            if assoc.is_established:
                assoc.release()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.scu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--calling-ae", required=True)
    parser.add_argument("--called-ae", default=NODE_AE)
    parser.add_argument("--wait", action="store_true", help="wait for a line on stdin before sending")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    paths = [Path(f) for f in args.files]
    assoc = storage_ae(args.calling_ae, contexts_of(paths)).associate(args.host, args.port, ae_title=args.called_ae)
    print("ready" if assoc.is_established else "refused", flush=True)
    if args.wait:
        sys.stdin.readline()
    for path, status in store_each(assoc, paths):
        print(json.dumps({"path": str(path), "status": status}), flush=True)
    if assoc.is_established:
        assoc.release()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
