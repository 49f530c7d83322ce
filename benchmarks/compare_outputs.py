"""Are two analyses of the same input the same? ``python -m benchmarks.compare_outputs A B``.

A and B are study result folders (``<out>/<StudyInstanceUID>/``) or output folders holding
them. Per DICOM object (matched by file name) every element is compared, with two things
normalised away: dates and times (DA, TM, DT: when it ran), group lengths, and the UIDs the pipeline makes
for its own objects, which are replaced by their order of first appearance (so a UID that
differs between runs still has to be referenced at exactly the same places). ``measurements.json``
and ``.csv`` are compared the same way; ``result.json`` without its timings. The PDF (``report.pdf``
and the Encapsulated PDF's document) is not compared: it prints the time it was generated
(``render_report_pdf(generated=...)`` fixed gives identical bytes). Exit status 0 when everything
else matches.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pydicom

_UID = re.compile(r"\b2\.25\.\d+\b")  # the pipeline's own UIDs (pydicom 2.25 form)


class _Canon:
    def __init__(self) -> None:
        self.map: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        return _UID.sub(lambda m: self.map.setdefault(m.group(0), f"<uid{len(self.map)}>"), text)


def dicom_lines(path: Path, canon: _Canon, source_uids: set[str]) -> list[str]:
    ds = pydicom.dcmread(path)
    lines = []

    def walk(dataset, prefix: str) -> None:
        for element in dataset:
            name = f"{prefix}{element.tag}"
            if element.tag.element == 0:  # group lengths follow from the lengths of the per-run UIDs
                continue
            if element.VR == "SQ":
                for i, item in enumerate(element.value):
                    walk(item, f"{name}[{i}].")
                continue
            if element.VR in ("DA", "TM", "DT"):
                lines.append(f"{name} <date/time>")
                continue
            if element.tag in (0x00420011, 0x00420015):  # the PDF (and its length) prints when it was generated
                lines.append(f"{name} <encapsulated document, not compared>")
                continue
            value = element.value
            if isinstance(value, (bytes, bytearray)):
                text = f"<{len(value)} bytes sha {__import__('hashlib').sha256(value).hexdigest()[:16]}>"
            else:
                text = str(value)
                if element.VR == "UI" and text not in source_uids and not text.startswith("1.2.840.10008"):
                    text = canon.map.setdefault(text, f"<uid{len(canon.map)}>")
                else:
                    text = canon(text)
            lines.append(f"{name} {element.VR} {text}")

    walk(ds.file_meta, "meta.")
    walk(ds, "")
    return lines


def _study_dirs(root: Path) -> list[Path]:
    if (root / "result.json").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / "result.json").is_file())


def compare_study(a: Path, b: Path, source_uids: set[str] | None = None) -> list[str]:
    """Differences between two study result folders, in words (empty: the same)."""
    problems = []
    source_uids = source_uids or set()
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    ca, cb = _Canon(), _Canon()
    # study, series and source instance UIDs are the input's; keep them verbatim
    result_a = json.loads((a / "result.json").read_text())
    for key in ("study_instance_uid",):
        source_uids.add(result_a.get(key, ""))
    for name in names:
        pa, pb = a / name, b / name
        if not (pa.is_file() and pb.is_file()):
            problems.append(f"{name}: only in {'A' if pa.is_file() else 'B'}")
            continue
        if name.endswith(".dcm"):
            la, lb = dicom_lines(pa, ca, source_uids), dicom_lines(pb, cb, source_uids)
            if la != lb:
                diff = next(((x, y) for x, y in zip(la, lb) if x != y), (len(la), len(lb)))
                problems.append(f"{name}: differs, first at {diff}")
        elif name == "result.json":
            ra, rb = (json.loads(p.read_text()) for p in (pa, pb))
            for r in (ra, rb):
                r.pop("timings_s", None)
                for skipped in r.get("skipped_files", []):  # as the input folder was named on the command line
                    skipped["path"] = Path(skipped["path"]).name
            if ca(json.dumps(ra, sort_keys=True)) != cb(json.dumps(rb, sort_keys=True)):
                problems.append("result.json differs (timings ignored)")
        elif name.endswith((".json", ".csv")):
            if ca(pa.read_text()) != cb(pb.read_text()):
                problems.append(f"{name} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_outputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    studies_a = {p.name: p for p in _study_dirs(args.a)}
    studies_b = {p.name: p for p in _study_dirs(args.b)}
    failed = False
    for uid in sorted(set(studies_a) | set(studies_b)):
        if uid not in studies_a or uid not in studies_b:
            print(f"{uid}: only in {'A' if uid in studies_a else 'B'}")
            failed = True
            continue
        problems = compare_study(studies_a[uid], studies_b[uid])
        print(f"{uid}: {'identical (dates and per-run UIDs normalised)' if not problems else 'DIFFERENT'}")
        for problem in problems:
            print(f"  {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
