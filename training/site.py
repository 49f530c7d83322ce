"""The site dataset from the command line: add a corrected SEG offline, list the cases.

    python -m training.site add SEG SOURCE_DIR [--site var/site] [--model models/paraspinal_t2ax]
    python -m training.site list [--site var/site]

``add`` does what the node does with a correction it receives by C-STORE
(:mod:`app.node.corrections`): the SEG is checked against the MR series in ``SOURCE_DIR``
(same frame of reference, segments that name a muscle and side of the model, no empty
segment, frames on the series' slices) and stored as a case (image and label NIfTI on the
source grid plus a provenance JSON with hashed UIDs; :mod:`paraspinal.site_dataset`). A SEG
that cannot be used is refused with the reason, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import pydicom

from app.node.audit import utc_iso
from app.node.logs import uid_hash
from paraspinal.corrections import CorrectionRefused, read_correction, read_source_series, referenced_series_uid
from paraspinal.model_bundle import find_bundle, parse_labels, read_metadata
from paraspinal.site_dataset import SiteCase, SiteDatasetError, add_correction, list_cases

DEFAULT_SITE_DIR = Path("var") / "site"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models"


def series_files(source_dir: Path, series_uid: str | None) -> list[Path]:
    """Files under ``source_dir`` of ``series_uid`` (all DICOM files when None)."""
    found = []
    for path in sorted(p for p in Path(source_dir).rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if series_uid is None or str(header.get("SeriesInstanceUID", "")) == series_uid:
            found.append(path)
    return found


def add(seg_path: Path, source_dir: Path, site_dir: Path, model: Path, quota_mb: float,
        calling_ae: str = "offline") -> SiteCase:
    """Check ``seg_path`` against its series in ``source_dir`` and store it as a site case."""
    labels = parse_labels(read_metadata(find_bundle(model)))
    seg = pydicom.dcmread(str(seg_path))
    series_uid = referenced_series_uid(seg)
    paths = series_files(source_dir, series_uid)
    if not paths:
        raise CorrectionRefused(f"{source_dir} holds no image of the series the SEG references")
    source = read_source_series(paths)
    correction = read_correction(seg, source, labels)
    version = str(read_metadata(find_bundle(model)).get("version", ""))
    return add_correction(site_dir, source, correction, hash_uid=uid_hash, calling_ae=calling_ae, corrects=None,
                          received_at=utc_iso(), quota_mb=quota_mb, model_version=version)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.site", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="add a corrected SEG of a series as a site case")
    a.add_argument("seg", type=Path)
    a.add_argument("source_dir", type=Path, help="folder holding the MR series the SEG references")
    a.add_argument("--site", type=Path, default=DEFAULT_SITE_DIR, help="site dataset folder")
    a.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle whose label table the SEG maps to")
    a.add_argument("--quota-mb", type=float, default=2048.0, help="disk quota of the site dataset, MiB")
    ls = sub.add_parser("list", help="list the site cases")
    ls.add_argument("--site", type=Path, default=DEFAULT_SITE_DIR)
    args = p.parse_args(argv)
    if args.command == "add":
        try:
            case = add(args.seg, args.source_dir, args.site, args.model, args.quota_mb)
        except (CorrectionRefused, SiteDatasetError) as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        fallbacks = [s for s in case.provenance["segments"] if s["matched_by"] != "code"]
        for s in fallbacks:
            print(f"note: segment {s['number']} mapped to label {s['label']} by its label text", file=sys.stderr)
        print(json.dumps({"case": case.case_id, "folder": str(case.folder),
                          "labelled_classes": list(case.labelled_classes)}))
        return 0
    for case in list_cases(args.site):
        print(f"{case.case_id}  {case.provenance.get('received_at', '')}  labels {list(case.labelled_classes)[1:]}  "
              f"from {case.provenance.get('calling_ae', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
