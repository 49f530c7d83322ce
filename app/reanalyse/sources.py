"""Which studies a re-analysis covers, written once to a spool file in the run's folder.

A source is a QIDO-RS query against a DICOMweb archive, a list of Study Instance UIDs (fetched
from that archive by WADO-RS), or a folder of studies on disk (one study per sub-folder). Each
is written to ``studies.tsv`` (one ``study_uid<TAB>folder`` line; folder empty for archive
studies) and read back line by line, so neither the driver's memory nor the order depends on
the archive (QIDO-RS paging over an archive that changes while results are stored into it is
not stable) or on the number of studies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import pydicom

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

log = logging.getLogger(__name__)

#: Studies asked for per QIDO-RS request.
QIDO_PAGE = 500
STUDY_INSTANCE_UID_TAG = "0020000D"


@dataclass(frozen=True)
class StudyItem:
    """One unit of work: a study in the archive (``folder`` empty) or in a folder on disk."""

    study_uid: str
    folder: str = ""


def _write_spool(items: Iterator[StudyItem], spool: Path) -> int:
    """Write items to ``spool`` (atomically, skipping repeats of the previous line); returns how many."""
    spool.parent.mkdir(parents=True, exist_ok=True)
    partial = spool.with_suffix(".partial")
    n = 0
    with open(partial, "w") as out:
        for item in items:
            out.write(f"{item.study_uid}\t{item.folder}\n")
            n += 1
    os.replace(partial, spool)
    return n


def _uids(found: list[dict]) -> Iterator[str]:
    for study in found:
        value = study.get(STUDY_INSTANCE_UID_TAG, {}).get("Value")
        if value:
            yield str(value[0])


def qido_study_uids(client: "DICOMwebClient", filters: Mapping[str, str], page: int | None = None) -> Iterator[str]:
    """Study Instance UIDs matching ``filters`` (QIDO-RS attribute=value pairs, e.g.
    ``ModalitiesInStudy=MR``, ``StudyDate=20200101-20201231``), page by page (``limit``/``offset``).

    Some archives do not page some filters: Orthanc 1.10 with its DICOMweb plugin 1.7 answers
    ``ModalitiesInStudy=MR&limit=N&offset=M`` with nothing for any M > 0. So when a full page is
    followed by an empty one, the last study of the full page is asked for again
    (``offset-1, limit 1``); if the archive does not return it, its paging is broken for this
    query and the whole list is asked for in one request instead (a UID may then come twice;
    :func:`spool_qido` keeps each once).
    """
    page = page or QIDO_PAGE
    offset = 0
    while True:
        found = client.search_for_studies(search_filters=dict(filters), offset=offset, limit=page,
                                          fields=["StudyInstanceUID"])
        yield from _uids(found)
        if offset and not found and not client.search_for_studies(
                search_filters=dict(filters), offset=offset - 1, limit=1, fields=["StudyInstanceUID"]):
            log.warning("the archive does not page this QIDO-RS query (offset %d gives nothing); asking for "
                        "all matching studies at once", offset)
            yield from _uids(client.search_for_studies(search_filters=dict(filters), fields=["StudyInstanceUID"]))
            return
        if len(found) < page:
            return
        offset += len(found)


def spool_qido(client: "DICOMwebClient", filters: Mapping[str, str], spool: Path) -> int:
    """Spool every study the query matches (each once); returns the count."""
    def unique() -> Iterator[StudyItem]:
        seen: set[str] = set()  # UIDs only (~70 bytes each): 100,000 studies are ~10 MB, once
        for uid in qido_study_uids(client, filters):
            if uid not in seen:
                seen.add(uid)
                yield StudyItem(uid)
    return _write_spool(unique(), spool)


def spool_list(study_list: Path, spool: Path) -> int:
    """Spool a text file of Study Instance UIDs (one per line; blank lines and ``#`` comments skipped)."""
    def items() -> Iterator[StudyItem]:
        with open(study_list) as lines:
            for line in lines:
                uid = line.split("#", 1)[0].strip()
                if uid:
                    yield StudyItem(uid)
    return _write_spool(items(), spool)


def _first_study_uid(folder: Path) -> str | None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                       .StudyInstanceUID)
        except Exception:  # not DICOM (a README, a DICOMDIR without the tag): try the next file
            continue
    return None


def spool_folder(root: Path, spool: Path) -> int:
    """Spool a folder holding one study per sub-folder (as ``python -m paraspinal.synthetic_study``
    or a PACS export writes them); the study is named by the first DICOM file found in it.
    Sub-folders without DICOM are skipped."""
    def items() -> Iterator[StudyItem]:
        for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            uid = _first_study_uid(sub)
            if uid:
                yield StudyItem(uid, str(sub.resolve()))
    return _write_spool(items(), spool)


def read_spool(spool: Path) -> Iterator[StudyItem]:
    """The spooled items, in order, one line at a time."""
    with open(spool) as lines:
        for line in lines:
            uid, _, folder = line.rstrip("\n").partition("\t")
            if uid:
                yield StudyItem(uid, folder)
