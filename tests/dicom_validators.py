"""Independent validators for the DICOM objects the product writes (SEG, TID 1500 SR).

Each validator runs a third-party implementation that shares no code with highdicom:

* ``dciodvfy`` (dicom3tools, Debian package) -- IOD/module/attribute conformance;
* ``segimage2itkimage`` and ``tid1500reader`` (dcmqi 1.5.7 from PyPI, DCMTK-based) --
  what 3D Slicer / QIICR tooling reads out of a SEG or a TID 1500 SR;
* ``dcmjs`` under Node (``tests/js/read_dicom.mjs``) -- how OHIF's JavaScript stack parses
  a SEG (naturalised dataset, BINARY bit unpacking, the cornerstone SEG adapter) and an SR.

The functions return structured results for tests to assert on.  They raise only when a
tool cannot be run or fails outright (:class:`ToolNotFoundError`, :class:`ToolFailedError`),
never because the object has findings: conformance findings are returned as data.

Install the Node side once with ``npm ci --prefix tests/js``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from pydicom.sr.coding import Code

__all__ = [
    "JS_DIR",
    "DciodvfyReport",
    "DciodvfyResult",
    "DcmqiSeg",
    "DcmqiSegment",
    "ToolFailedError",
    "ToolNotFoundError",
    "dciodvfy",
    "dciodvfy_errors",
    "dciodvfy_report",
    "dcmjs_read",
    "dcmqi_read_seg",
    "dcmqi_read_sr",
]

#: Folder of the Node project (package.json, package-lock.json, read_dicom.mjs).
JS_DIR = Path(__file__).resolve().parent / "js"
_READ_DICOM_JS = JS_DIR / "read_dicom.mjs"

_DEFAULT_TIMEOUT_S = 120.0


class ToolNotFoundError(RuntimeError):
    """An external validator (executable or Node package) is not installed."""


class ToolFailedError(RuntimeError):
    """An external validator ran but failed (non-zero exit, missing or unreadable output)."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
    ) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = [
            message,
            f"command: {' '.join(self.command)}",
            f"exit status: {returncode}",
            f"stderr:\n{stderr.strip() or '(empty)'}",
        ]
        if stdout.strip():
            detail.append(f"stdout:\n{_tail(stdout)}")
        super().__init__("\n".join(detail))


def _tail(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _find_executable(name: str) -> str:
    """Locate ``name`` next to the running interpreter (virtualenv) or on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ToolNotFoundError(f"{name!r} not found next to {sys.executable} or on PATH")
    return found


def _run(command: Sequence[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolFailedError(
            f"{Path(command[0]).name} did not finish within {timeout} s",
            command=command,
            returncode=None,
            stdout=exc.stdout if isinstance(exc.stdout, str) else "",
            stderr=exc.stderr if isinstance(exc.stderr, str) else "",
        ) from exc


def _dcmtk_error_lines(*texts: str) -> list[str]:
    """Error/fatal lines of dcmqi's console output (DCMTK logger ``E:``/``F:``, dcmqi ``ERROR``)."""
    lines = []
    for text in texts:
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith(("E: ", "F: ", "ERROR")):
                lines.append(stripped)
    return lines


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DICOM file not found: {p}")
    return p


# --------------------------------------------------------------------------- dciodvfy


class DciodvfyReport(NamedTuple):
    """``(errors, warnings)`` as returned by :func:`dciodvfy_report`."""

    errors: list[str]
    warnings: list[str]


@dataclass(frozen=True)
class DciodvfyResult:
    """Full outcome of one ``dciodvfy`` run.

    Attributes:
        iod: the IOD name dciodvfy recognised (first line of its output, e.g.
            ``"Segmentation"``, ``"Comprehensive3DSR"``), or ``None``.
        errors: lines starting with ``Error``.
        warnings: lines starting with ``Warning``.
        other: every other non-empty output line.
        returncode: dciodvfy's exit status (1 when it reported errors, in our runs).
        output: the complete stderr + stdout text.
    """

    iod: str | None
    errors: list[str]
    warnings: list[str]
    other: list[str]
    returncode: int
    output: str


def dciodvfy(path: str | os.PathLike[str], *, timeout: float = _DEFAULT_TIMEOUT_S) -> DciodvfyResult:
    """Run dicom3tools ``dciodvfy`` on one file and classify its output lines.

    dciodvfy writes its findings to stderr; stdout is read as well.  Findings never raise;
    only a missing executable (:class:`ToolNotFoundError`) or a timeout do.
    """
    p = _existing_file(path)
    command = [_find_executable("dciodvfy"), str(p)]
    proc = _run(command, timeout=timeout)
    output = proc.stderr + proc.stdout
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    other = [line for line in lines if not line.startswith(("Error", "Warning"))]
    # The IOD name is printed alone on the first line (e.g. "Segmentation").
    iod = other[0].strip() if other and " " not in other[0].strip() else None
    return DciodvfyResult(
        iod=iod, errors=errors, warnings=warnings, other=other, returncode=proc.returncode, output=output
    )


def dciodvfy_errors(path: str | os.PathLike[str], *, timeout: float = _DEFAULT_TIMEOUT_S) -> list[str]:
    """Every ``dciodvfy`` output line that starts with ``Error`` (empty list: no errors)."""
    return dciodvfy(path, timeout=timeout).errors


def dciodvfy_report(path: str | os.PathLike[str], *, timeout: float = _DEFAULT_TIMEOUT_S) -> DciodvfyReport:
    """``(errors, warnings)``: the ``Error`` and ``Warning`` lines of ``dciodvfy``."""
    result = dciodvfy(path, timeout=timeout)
    return DciodvfyReport(errors=result.errors, warnings=result.warnings)


# --------------------------------------------------------------------------- dcmqi SEG


def _code(item: dict[str, Any] | None) -> Code | None:
    """dcmqi JSON code ``{CodeValue, CodingSchemeDesignator, CodeMeaning}`` -> pydicom Code.

    ``pydicom.sr.coding.Code`` equality compares value and scheme only (meaning ignored).
    """
    if not item:
        return None
    return Code(
        value=str(item["CodeValue"]),
        scheme_designator=str(item["CodingSchemeDesignator"]),
        meaning=str(item.get("CodeMeaning", "")),
    )


@dataclass
class DcmqiSegment:
    """One segment as written out by ``segimage2itkimage``.

    Attributes:
        segment_number: dcmqi ``labelID`` (== DICOM Segment Number); the voxel value of this
            segment in ``array``.
        label, description, algorithm_type, algorithm_name, tracking_id, tracking_uid:
            from the segment attributes in dcmqi's meta JSON (``None`` when absent/empty).
        category, type, type_modifier, anatomic_region, anatomic_region_modifier: codes.
        recommended_display_rgb: dcmqi's RGB conversion of RecommendedDisplayCIELabValue.
        attributes: the raw JSON object for the segment.
        nifti_path: the NIfTI file holding the segment.
        array: voxel data as loaded by nibabel, index order (i, j, k) = (column, row, frame
            position); the slice axis of an axial SEG is the last axis.
        affine: nibabel's voxel -> RAS+ world (mm) affine.  DICOM LPS = diag(-1, -1, 1) @ RAS.
    """

    segment_number: int
    label: str | None
    description: str | None
    algorithm_type: str | None
    algorithm_name: str | None
    tracking_id: str | None
    tracking_uid: str | None
    category: Code | None
    type: Code | None
    type_modifier: Code | None
    anatomic_region: Code | None
    anatomic_region_modifier: Code | None
    recommended_display_rgb: list[int] | None
    attributes: dict[str, Any]
    nifti_path: Path
    array: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask of this segment (voxels whose value equals ``segment_number``)."""
        return self.array == self.segment_number

    @property
    def voxel_count(self) -> int:
        """Number of voxels in the segment."""
        return int(np.count_nonzero(self.mask))

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel -> DICOM patient (LPS, mm) affine."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine

    def slice_voxel_counts(self, decimals: int = 3) -> dict[tuple[float, float, float], int]:
        """Voxel count per slice (last axis), keyed by the slice's DICOM position.

        The key is the LPS position of voxel (0, 0, k), i.e. the Image Position (Patient)
        of the corresponding source image for a SEG on the source grid, rounded to
        ``decimals``.  Every slice of the written volume is listed, empty ones with 0.
        """
        mask = self.mask
        counts: dict[tuple[float, float, float], int] = {}
        lps = self.affine_lps
        for k in range(mask.shape[2]):
            pos = lps @ np.array([0.0, 0.0, float(k), 1.0])
            key = tuple(round(float(v), decimals) + 0.0 for v in pos[:3])
            counts[key] = int(np.count_nonzero(mask[:, :, k]))  # type: ignore[index]
        return counts  # type: ignore[return-value]


@dataclass
class DcmqiSeg:
    """Result of :func:`dcmqi_read_seg`.

    Attributes:
        output_dir: folder holding dcmqi's meta JSON and NIfTI files.
        meta: dcmqi's meta JSON (series attributes and ``segmentAttributes``).
        segments: one entry per segment, ordered by segment number.
        stdout, stderr: dcmqi's console output (warnings such as
            ``W: ContentCreatorName (0070,0084) absent ...`` appear on stderr).
    """

    output_dir: Path
    meta: dict[str, Any]
    segments: list[DcmqiSegment]
    stdout: str
    stderr: str

    def segment(self, segment_number: int) -> DcmqiSegment:
        """The segment with the given number (``KeyError`` if absent)."""
        for seg in self.segments:
            if seg.segment_number == segment_number:
                return seg
        raise KeyError(f"segment {segment_number} not in dcmqi output ({[s.segment_number for s in self.segments]})")


def _nonempty(value: Any) -> Any:
    return None if value in (None, "") else value


def dcmqi_read_seg(
    path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    timeout: float = _DEFAULT_TIMEOUT_S,
) -> DcmqiSeg:
    """Convert a DICOM SEG with dcmqi ``segimage2itkimage`` and load the result.

    Runs ``segimage2itkimage --inputDICOM PATH --outputDirectory OUT --outputType nifti``
    (dcmqi 1.5.7 flags) with OUT a fresh sub-folder of ``workdir``, then reads ``meta.json``
    and, per segment group ``g`` (1-based, the order of ``segmentAttributes``), ``g.nii.gz``
    with nibabel.  Without ``--mergeSegments`` every group holds one segment, whose voxels
    carry its ``labelID``.

    Raises:
        ToolFailedError: dcmqi exited non-zero, logged an error (``E:``/``F:``/``ERROR``
            line) or its output is missing; the message includes dcmqi's stderr and stdout.
    """
    p = _existing_file(path)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="segimage2itkimage_", dir=workdir))
    command = [
        _find_executable("segimage2itkimage"),
        "--inputDICOM",
        str(p),
        "--outputDirectory",
        str(out_dir),
        "--outputType",
        "nifti",
    ]
    proc = _run(command, timeout=timeout)

    def fail(message: str) -> ToolFailedError:
        return ToolFailedError(
            message, command=command, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr
        )

    if proc.returncode != 0:
        raise fail(f"segimage2itkimage failed on {p}")
    error_lines = _dcmtk_error_lines(proc.stderr, proc.stdout)
    if error_lines:
        raise fail(f"segimage2itkimage reported errors on {p}: {error_lines}")
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise fail(f"segimage2itkimage wrote no meta.json for {p} (files: {sorted(os.listdir(out_dir))})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise fail(f"segimage2itkimage wrote unreadable JSON {meta_path}: {exc}") from exc

    segments: list[DcmqiSegment] = []
    for group_index, group in enumerate(meta.get("segmentAttributes", []), start=1):
        nifti_path = out_dir / f"{group_index}.nii.gz"
        if not nifti_path.is_file():
            raise fail(f"segimage2itkimage wrote no {nifti_path.name} for segment group {group_index}")
        image = nib.load(str(nifti_path))
        array = np.asarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=float)
        for attrs in group:
            rgb = attrs.get("recommendedDisplayRGBValue")
            segments.append(
                DcmqiSegment(
                    segment_number=int(attrs["labelID"]),
                    label=_nonempty(attrs.get("SegmentLabel")),
                    description=_nonempty(attrs.get("SegmentDescription")),
                    algorithm_type=_nonempty(attrs.get("SegmentAlgorithmType")),
                    algorithm_name=_nonempty(attrs.get("SegmentAlgorithmName")),
                    tracking_id=_nonempty(attrs.get("TrackingIdentifier")),
                    tracking_uid=_nonempty(attrs.get("TrackingUniqueIdentifier")),
                    category=_code(attrs.get("SegmentedPropertyCategoryCodeSequence")),
                    type=_code(attrs.get("SegmentedPropertyTypeCodeSequence")),
                    type_modifier=_code(attrs.get("SegmentedPropertyTypeModifierCodeSequence")),
                    anatomic_region=_code(attrs.get("AnatomicRegionSequence")),
                    anatomic_region_modifier=_code(attrs.get("AnatomicRegionModifierSequence")),
                    recommended_display_rgb=list(rgb) if rgb is not None else None,
                    attributes=attrs,
                    nifti_path=nifti_path,
                    array=array,
                    affine=affine,
                )
            )
    segments.sort(key=lambda s: s.segment_number)
    return DcmqiSeg(output_dir=out_dir, meta=meta, segments=segments, stdout=proc.stdout, stderr=proc.stderr)


# --------------------------------------------------------------------------- dcmqi SR


def dcmqi_read_sr(
    path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    timeout: float = _DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Read a TID 1500 SR with dcmqi ``tid1500reader`` and return its JSON.

    Runs ``tid1500reader --inputDICOM PATH --outputMetadata OUT/measurements.json`` with OUT a
    fresh sub-folder of ``workdir``.
    Keys of interest: ``Measurements`` (one per measurement group: ``TrackingIdentifier``,
    ``TrackingUniqueIdentifier``, ``Finding``, ``FindingSite``, ``ReferencedSegment``,
    ``segmentationSOPInstanceUID``, ``measurementItems`` with ``quantity``, ``units`` and
    ``value`` -- the value is the DS string, e.g. ``"12.5"``), ``observerContext``,
    ``procedureReported``, ``compositeContext``, ``imageLibrary``.

    Raises:
        ToolFailedError: tid1500reader exited non-zero, logged an error (``E:``/``F:``/
            ``ERROR`` line; it exits 0 on non-SR input) or wrote no readable JSON; the
            message includes its stderr and stdout.
    """
    p = _existing_file(path)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_json = Path(tempfile.mkdtemp(prefix="tid1500reader_", dir=workdir)) / "measurements.json"
    command = [_find_executable("tid1500reader"), "--inputDICOM", str(p), "--outputMetadata", str(out_json)]
    proc = _run(command, timeout=timeout)

    def fail(message: str) -> ToolFailedError:
        return ToolFailedError(
            message, command=command, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr
        )

    if proc.returncode != 0:
        raise fail(f"tid1500reader failed on {p}")
    # tid1500reader exits 0 on objects it cannot interpret (e.g. a SEG: "E: SOP Class UID
    # does not match one of the known SR document classes") and writes a JSON with empty
    # flags, so its error log lines are checked as well.
    error_lines = _dcmtk_error_lines(proc.stderr, proc.stdout)
    if error_lines:
        raise fail(f"tid1500reader reported errors on {p}: {error_lines}")
    if not out_json.is_file():
        raise fail(f"tid1500reader wrote no {out_json.name} for {p}")
    try:
        return json.loads(out_json.read_text())
    except json.JSONDecodeError as exc:
        raise fail(f"tid1500reader wrote unreadable JSON {out_json}: {exc}") from exc


# --------------------------------------------------------------------------- dcmjs


def dcmjs_read(
    path: str | os.PathLike[str],
    source_paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    timeout: float = _DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Parse a SEG or SR with dcmjs under Node (``tests/js/read_dicom.mjs``), as OHIF does.

    Common keys: ``kind`` (``"SEG"``, ``"SR"`` or ``"OTHER"``), ``dcmjsVersion``,
    ``sopClassUID``, ``sopInstanceUID``, ``transferSyntaxUID``, ``studyInstanceUID``,
    ``seriesInstanceUID``, ``modality``.

    SEG (``result["seg"]``): ``segments`` (``segmentNumber``, ``label``, ``category``,
    ``type``, ``typeModifiers`` -- codes as ``{CodeValue, CodingSchemeDesignator,
    CodeMeaning}``), ``frames`` (per frame: ``segmentNumber``, ``imagePositionPatient``,
    ``referencedSOPInstanceUID``, ``setPixels``, ``boundingBox``), ``pixelDecoding``
    (``voxelCounts`` per segment number after ``dcmjs.data.BitArray.unpack``; ``None``
    for encapsulated transfer syntaxes).  With ``source_paths`` (the referenced source
    images) also ``adapter``: the result of
    ``dcmjs.adapters.Cornerstone.Segmentation.generateToolState`` -- ``voxelCounts`` per
    segment and ``perImage`` counts keyed by source SOP Instance UID.  JSON object keys
    are strings (``voxelCounts["1"]``).

    SR (``result["sr"]``): ``documentTitle``, ``templateIdentifier``, ``procedureReported``,
    ``measurementGroups`` (``trackingIdentifier``, ``trackingUid``, ``finding``,
    ``findingSites``, ``referencedSegment`` {``sopInstanceUID``, ``segmentNumber``},
    ``measurements`` [{``conceptName``, ``value``, ``unit``}]) and ``numericItems`` (every
    NUM item anywhere in the tree).

    Raises:
        ToolNotFoundError: Node or ``tests/js/node_modules`` is missing (message says to run
            ``npm ci --prefix tests/js``).
        ToolFailedError: the script failed; the message includes its stderr.
    """
    p = _existing_file(path)
    sources = [_existing_file(s) for s in (source_paths or [])]
    node = shutil.which("node")
    if node is None:
        raise ToolNotFoundError("Node.js ('node') not found on PATH; dcmjs validation needs Node >= 20")
    if not (JS_DIR / "node_modules" / "dcmjs" / "package.json").is_file():
        raise ToolNotFoundError(
            f"dcmjs is not installed in {JS_DIR / 'node_modules'}: run npm ci --prefix tests/js "
            "(from the repository root)"
        )
    command = [node, str(_READ_DICOM_JS), str(p)]
    if sources:
        command += ["--source", *map(str, sources)]
    proc = _run(command, timeout=timeout, cwd=JS_DIR)
    if proc.returncode != 0:
        raise ToolFailedError(
            f"dcmjs (read_dicom.mjs) failed on {p}",
            command=command,
            returncode=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
        )
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise ToolFailedError(
            f"read_dicom.mjs printed no valid JSON for {p}: {exc}",
            command=command,
            returncode=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
        ) from exc
    result["stderr"] = proc.stderr
    return result


def bytes_without_dates(ds) -> bytes:
    """The data set encoded as a Part 10 file with every DA/TM/DT value emptied: two objects built
    from the same input at different times compare equal byte for byte."""
    for element in ds.iterall():
        if element.VR in ("DA", "TM", "DT"):
            element.value = ""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
