"""Whole synthetic MR studies written as DICOM folders, with their ground truth.

A lumbar study holds the axial T2 series the node should analyse (one stack,
or three disc-angled stacks in ONE series) and, optionally, the distractors
a real exam has: a 3-plane localizer, a sagittal T2 and an axial T1 on the
same geometry as the T2. Sagittal-only and brain studies exist for
selector rejection tests.

Geometry is LPS patient mm; truth volumes are indexed (slice, row, col) in the
written grid, slice k of a stack being the k-th file of that stack (its
InstanceNumbers increase with k). Each series goes into its own folder
``<SeriesNumber>_<description>`` under ``out_dir``.

With ``level_seg=True`` (or :func:`add_level_seg`) the study also gets a labelled source for
lumbar levels: a sagittal T2 and a DICOM SEG over it whose segments are the vertebral bodies
L1..S1 and the discs L1/L2..L5/S1 (SNOMED CT codes, see :mod:`paraspinal.levels`), drawn from
the phantom's spine, so every level's z range is known (:class:`LevelSegTruth`).

CLI: ``python -m paraspinal.synthetic_study OUT_DIR [--seed N] [--oblique]
[--transfer-syntax NAME] [--flip] [--non-square] [--no-distractors] [--level-seg]
[--truth-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from pydicom.uid import generate_uid

from paraspinal.dicom_series_writer import (
    TRANSFER_SYNTAXES,
    SeriesInfo,
    StackGeometry,
    StudyInfo,
    axial_stack_geometry,
    oriented_stack_geometry,
    write_mr_series,
)
from paraspinal.phantom import LABEL_NAMES, HeadPhantom, LumbarPhantom, Rendering, fat_fractions_from_masks

__all__ = [
    "LevelSegTruth",
    "StackTruth",
    "SyntheticStudy",
    "add_level_seg",
    "make_synthetic_study",
    "make_sagittal_only_study",
    "make_brain_study",
    "main",
]

#: Oblique mode: (disc level, tilt about the left-right axis in degrees) of each stack.
OBLIQUE_STACKS: tuple[tuple[str, float], ...] = (("L2/L3", -12.0), ("L3/L4", 0.0), ("L4/L5", 15.0))
OBLIQUE_SLICES_PER_STACK = 5
_NON_SQUARE_SPACING = (0.8, 0.6)


@dataclass
class StackTruth:
    """Ground truth of one stack of the target series; arrays are (slice, row, col) in the written grid."""

    sop_instance_uids: list[str]  # slice order
    paths: list[Path]
    geometry: StackGeometry
    labels: np.ndarray  # uint8, 0..8 (see paraspinal.phantom.LABEL_NAMES)
    image: np.ndarray  # uint16, exactly the written pixels
    fat_mask: np.ndarray  # bool, every fat voxel
    fat_fractions: dict[int, float]  # true fat fraction per label on this stack's voxels
    tilt_deg: float = 0.0
    level: str | None = None  # disc level of a disc-angled stack


@dataclass
class LevelSegTruth:
    """A labelled spine SEG written by :func:`add_level_seg` and the truth behind it."""

    seg_path: Path
    seg_sop_instance_uid: str
    seg_series_uid: str
    sagittal_series_uid: str
    sagittal_paths: list[Path]
    frame_of_reference_uid: str
    levels: list[str]  # labelled levels, head to feet
    z_ranges: dict[str, tuple[float, float]]  # level -> (z low, z high) mm of its labelled voxels' region


@dataclass
class SyntheticStudy:
    """What :func:`make_synthetic_study` wrote, and the truth behind it."""

    root: Path
    seed: int
    study_uid: str
    t2_series_uid: str  # the target series (for a brain study: its axial T2, which must be rejected)
    stacks: list[StackTruth]
    t2_paths: list[Path]
    target_fat_fractions: dict[int, float]
    distractor_series_uids: dict[str, str] = field(default_factory=dict)  # "localizer", "sagittal_t2", "axial_t1"
    distractor_paths: dict[str, list[Path]] = field(default_factory=dict)
    transfer_syntax: str = "explicit_little"
    study_info: StudyInfo | None = None
    fov_centre_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    level_segs: list[LevelSegTruth] = field(default_factory=list)

    @property
    def all_paths(self) -> list[Path]:
        """Every file written, target series first."""
        return (list(self.t2_paths) + [p for paths in self.distractor_paths.values() for p in paths]
                + [p for seg in self.level_segs for p in [*seg.sagittal_paths, seg.seg_path]])

    @property
    def t2_sop_instance_uids(self) -> list[str]:
        return [uid for stack in self.stacks for uid in stack.sop_instance_uids]

    @property
    def fat_fractions(self) -> dict[int, float]:
        """True fat fraction per label over all stacks of the target series."""
        if not self.stacks:
            return {}
        labels = np.concatenate([s.labels.ravel() for s in self.stacks])
        fat = np.concatenate([s.fat_mask.ravel() for s in self.stacks])
        return fat_fractions_from_masks(labels, fat)

    def summary(self) -> dict:
        """JSON-serialisable description (UIDs, folders, fat fractions)."""
        return {
            "root": str(self.root), "seed": self.seed, "study_uid": self.study_uid,
            "t2_series_uid": self.t2_series_uid, "transfer_syntax": self.transfer_syntax,
            "t2_files": len(self.t2_paths),
            "stacks": [{"level": s.level, "tilt_deg": s.tilt_deg, "shape": list(s.labels.shape),
                        "sop_instance_uids": s.sop_instance_uids,
                        "fat_fractions": {LABEL_NAMES[k]: round(v, 4) for k, v in s.fat_fractions.items()}}
                       for s in self.stacks],
            "target_fat_fractions": {LABEL_NAMES[k]: round(v, 4) for k, v in self.target_fat_fractions.items()},
            "true_fat_fractions": {LABEL_NAMES[k]: round(v, 4) for k, v in self.fat_fractions.items()},
            "distractor_series_uids": self.distractor_series_uids,
        }


def _to_uint16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16)


def _series_dir(root: Path, info: SeriesInfo) -> Path:
    return root / f"{info.series_number:02d}_{info.series_description}"


def _lumbar_study_info(seed: int) -> StudyInfo:
    return StudyInfo(patient_name=f"PHANTOM^LUMBAR{seed}", patient_id=f"PHANTOM{seed:04d}",
                     accession_number=f"SYN{seed:05d}", study_description="MRI LUMBAR SPINE")


def _t2_series(body_part: str, number: int = 3) -> SeriesInfo:
    return SeriesInfo(series_number=number, series_description="t2_tse_tra", protocol_name="t2_tse_tra",
                      echo_time=100.0, repetition_time=4000.0, body_part_examined=body_part)


def _write(root: Path, image: np.ndarray, geometry: StackGeometry, study: StudyInfo, info: SeriesInfo,
           transfer_syntax: str, uids: Sequence[str] | None = None) -> list[Path]:
    return write_mr_series(_to_uint16(image), geometry, _series_dir(root, info), study=study, series=info,
                           transfer_syntax=transfer_syntax, sop_instance_uids=uids)


def _localizer(root: Path, phantom: LumbarPhantom | HeadPhantom, study: StudyInfo, body_part: str, centre: Sequence[float],
               transfer_syntax: str) -> tuple[str, list[Path]]:
    """3-plane localizer: one axial, one sagittal, one coronal gradient-echo image."""
    info = SeriesInfo(series_number=1, series_description="localizer", protocol_name="localizer",
                      image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), echo_time=2.5, repetition_time=8.0,
                      echo_train_length=1, flip_angle=20.0, scanning_sequence=("GR",), sequence_variant=("SP",),
                      sequence_name="*fl2d1", body_part_examined=body_part)
    planes = [((1, 0, 0), (0, 1, 0)), ((0, 1, 0), (0, 0, -1)), ((1, 0, 0), (0, 0, -1))]
    geometry = StackGeometry.concatenate([
        oriented_stack_geometry(r, c, 1, 128, 128, (2.0, 2.0), 8.0, centre_lps=centre, slice_thickness=8.0)
        for r, c in planes])
    image = phantom.render(geometry, contrast="t1", noise_sigma=8.0, bias_field_strength=0.2).image
    return info.series_instance_uid, _write(root, image, geometry, study, info, transfer_syntax)


def _sagittal_t2(root: Path, phantom: LumbarPhantom, study: StudyInfo, body_part: str, centre: Sequence[float],
                 transfer_syntax: str, number: int = 2) -> tuple[str, list[Path]]:
    """Sagittal T2: columns run posteriorly, rows towards the feet, slices across the spine."""
    info = SeriesInfo(series_number=number, series_description="t2_tse_sag", protocol_name="t2_tse_sag",
                      echo_time=100.0, repetition_time=3500.0, body_part_examined=body_part)
    geometry = oriented_stack_geometry((0, 1, 0), (0, 0, -1), 9, 192, 192, (1.25, 1.25), 4.0, centre_lps=centre,
                                       slice_thickness=3.5)
    image = phantom.render(geometry, contrast="t2").image
    return info.series_instance_uid, _write(root, image, geometry, study, info, transfer_syntax)


def make_synthetic_study(out_dir: str | Path, *, seed: int = 0, rows: int = 256, cols: int = 256, n_slices: int = 20,
                         pixel_spacing: tuple[float, float] = (0.9375, 0.9375), slice_spacing: float = 4.4,
                         oblique_stacks: bool = False, non_square_pixels: bool = False, flip: bool = False,
                         transfer_syntax: str = "explicit_little", include_distractors: bool = True,
                         body_part: str = "LSPINE", fat_fractions: float | Mapping[int, float] | None = None,
                         noise_sigma: float = 10.0, bias_field_strength: float = 0.3, supersample: int = 1,
                         study: StudyInfo | None = None, level_seg: bool = False) -> SyntheticStudy:
    """Write a synthetic lumbar MR study into ``out_dir`` and return its truth.

    The axial T2 (TE 100 ms, TR 4000 ms, "t2_tse_tra") is centred on the spine.
    ``rows``/``cols``/``pixel_spacing`` (mm, DICOM order: between rows, between
    columns) set the matrix; ``n_slices`` x ``slice_spacing`` (mm) the coverage.
    ``oblique_stacks``: one series of 3 stacks x 5 slices centred on the L2/L3,
    L3/L4 and L4/L5 discs and tilted -12, 0 and +15 degrees about the left-right
    axis (``n_slices`` is then ignored). ``non_square_pixels``: PixelSpacing
    (0.8, 0.6) with rows/cols adjusted to keep the field of view. ``flip``: rows
    run anteriorly, columns to the patient's right and slices towards the feet.
    ``fat_fractions``, ``noise_sigma``, ``bias_field_strength``, ``supersample``
    go to :class:`~paraspinal.phantom.LumbarPhantom`. ``level_seg``: also write a sagittal T2
    and a SEG labelling its vertebrae and discs (:func:`add_level_seg`).
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; choose from {sorted(TRANSFER_SYNTAXES)}")
    root = Path(out_dir)
    phantom = LumbarPhantom(seed, fat_fractions)
    study = study or _lumbar_study_info(seed)
    if non_square_pixels:
        fov = (rows * pixel_spacing[0], cols * pixel_spacing[1])
        pixel_spacing = _NON_SQUARE_SPACING
        rows, cols = int(round(fov[0] / pixel_spacing[0])), int(round(fov[1] / pixel_spacing[1]))
    # Centre the field of view on the back muscles, as a spine coil acquisition would be.
    fov_y = phantom.spine_y0 + 25.0
    flips = dict(flip_rows=flip, flip_cols=flip, reverse_slice_order=flip)
    thickness = 0.9 * slice_spacing  # 10 % gap, as usual for 2D TSE
    if oblique_stacks:
        discs = phantom.disc_centres()
        plan = [(level, tilt, axial_stack_geometry(
            OBLIQUE_SLICES_PER_STACK, rows, cols, pixel_spacing, slice_spacing,
            origin_lps=(0.0, fov_y, discs[level][2]), tilt_deg_about_lr=tilt, slice_thickness=thickness, **flips))
            for level, tilt in OBLIQUE_STACKS]
    else:
        plan = [(None, 0.0, axial_stack_geometry(n_slices, rows, cols, pixel_spacing, slice_spacing,
                                                  origin_lps=(0.0, fov_y, 0.0), slice_thickness=thickness, **flips))]
    geometry = StackGeometry.concatenate([g for _, _, g in plan])
    contrasts = ("t2", "t1") if include_distractors else ("t2",)
    renders = phantom.render_contrasts(geometry, contrasts, supersample=supersample, noise_sigma=noise_sigma,
                                       bias_field_strength=bias_field_strength)
    t2: Rendering = renders["t2"]
    t2_info = _t2_series(body_part)
    uids = [generate_uid() for _ in range(geometry.n_slices)]
    pixels = _to_uint16(t2.image)
    t2_paths = _write(root, pixels, geometry, study, t2_info, transfer_syntax, uids)

    stacks, start = [], 0
    for level, tilt, g in plan:
        sl = slice(start, start + g.n_slices)
        start += g.n_slices
        stacks.append(StackTruth(sop_instance_uids=uids[sl], paths=t2_paths[sl], geometry=g, labels=t2.labels[sl],
                                 image=pixels[sl], fat_mask=t2.fat_mask[sl],
                                 fat_fractions=fat_fractions_from_masks(t2.labels[sl], t2.fat_mask[sl]),
                                 tilt_deg=tilt, level=level))

    result = SyntheticStudy(root=root, seed=seed, study_uid=study.study_instance_uid,
                            t2_series_uid=t2_info.series_instance_uid, stacks=stacks, t2_paths=t2_paths,
                            target_fat_fractions=phantom.target_fat_fractions, transfer_syntax=transfer_syntax,
                            study_info=study, fov_centre_lps=(0.0, fov_y, 0.0))
    if include_distractors:
        centre = (0.0, fov_y, 0.0)
        uid, paths = _localizer(root, phantom, study, body_part, centre, transfer_syntax)
        result.distractor_series_uids["localizer"], result.distractor_paths["localizer"] = uid, paths
        uid, paths = _sagittal_t2(root, phantom, study, body_part, centre, transfer_syntax)
        result.distractor_series_uids["sagittal_t2"], result.distractor_paths["sagittal_t2"] = uid, paths
        # Axial T1 on exactly the T2's geometry: only the weighting (TE/TR) tells them apart.
        t1_info = SeriesInfo(series_number=4, series_description="t1_tse_tra", protocol_name="t1_tse_tra",
                             echo_time=10.0, repetition_time=600.0, echo_train_length=3, flip_angle=150.0,
                             sequence_name="*tse2d1_3", body_part_examined=body_part)
        paths = _write(root, renders["t1"].image, geometry, study, t1_info, transfer_syntax)
        result.distractor_series_uids["axial_t1"], result.distractor_paths["axial_t1"] = t1_info.series_instance_uid, paths
    if level_seg:
        add_level_seg(result)
    return result


#: SEG segment order: head to feet, vertebral bodies and discs (names as in paraspinal.levels).
LEVEL_SEG_LEVELS = ("L1", "L1/L2", "L2", "L2/L3", "L3", "L3/L4", "L4", "L4/L5", "L5", "L5/S1", "S1")


def add_level_seg(study: SyntheticStudy, *, levels: Sequence[str] = LEVEL_SEG_LEVELS,
                  frame_of_reference_uid: str | None = None, series_number: int = 20,
                  description: str = "spine labels") -> LevelSegTruth:
    """Write a labelled source for lumbar levels into ``study``: a sagittal T2 (series
    ``series_number``, on ``frame_of_reference_uid`` or the study's) and a BINARY DICOM SEG over
    it (series ``series_number + 1``, ``description``) with one segment per level of ``levels``
    that the sagittal slices hold: vertebral bodies by their SNOMED CT code (CID 7603; S1 as
    TotalSegmentator codes it) and discs by theirs (CID 7604), category "Anatomical Structure",
    drawn from the phantom (:meth:`~paraspinal.phantom.LumbarPhantom.spine_levels_at`), as a
    radiologist would label them (algorithm type MANUAL)."""
    import highdicom as hd
    import pydicom

    from paraspinal.levels import spine_level

    if study.study_info is None:
        raise ValueError("the study was not made by make_synthetic_study (no StudyInfo kept)")
    phantom = LumbarPhantom(study.seed)
    info = SeriesInfo(series_number=series_number, series_description="t2_tse_sag_spine", protocol_name="t2_tse_sag",
                      echo_time=100.0, repetition_time=3500.0, frame_of_reference_uid=frame_of_reference_uid)
    geometry = oriented_stack_geometry((0, 1, 0), (0, 0, -1), 7, 192, 192, (1.25, 1.25), 4.0,
                                       centre_lps=study.fov_centre_lps, slice_thickness=3.5)
    image = phantom.render(geometry, contrast="t2").image
    paths = _write(study.root, image, geometry, study.study_info, info, "explicit_little")
    names = phantom.spine_levels_at(geometry.voxel_centres().reshape(-1, 3))
    wanted = [name for name in levels if name in set(names)]
    numbers = {name: i for i, name in enumerate(wanted, start=1)}
    labelmap = np.array([numbers.get(n, 0) if n else 0 for n in names], dtype=np.uint8).reshape(
        geometry.n_slices, 192, 192)
    category = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
    descriptions = []
    for name in wanted:
        level = spine_level(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=numbers[name], segment_label=name, segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(level.code, "SCT", level.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    sources = [pydicom.dcmread(p) for p in paths]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labelmap, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=series_number + 1,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="SYNTHETIC",
        manufacturer_model_name="spine labeller", software_versions="paraspinal.synthetic", device_serial_number="0",
        content_label="SPINE", content_description="Lumbar vertebrae and discs", content_creator_name="LABELLER^SYN",
        series_description=description)
    seg_dir = study.root / f"{series_number + 1:02d}_{description.replace(' ', '_')}"
    seg_dir.mkdir(parents=True, exist_ok=True)
    seg_path = seg_dir / "SEG_1.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    ranges = phantom.level_z_ranges()
    truth = LevelSegTruth(seg_path=seg_path, seg_sop_instance_uid=str(seg.SOPInstanceUID),
                          seg_series_uid=str(seg.SeriesInstanceUID), sagittal_series_uid=info.series_instance_uid,
                          sagittal_paths=paths, frame_of_reference_uid=str(sources[0].FrameOfReferenceUID),
                          levels=wanted, z_ranges={name: ranges[name] for name in wanted})
    study.level_segs.append(truth)
    return truth


def make_sagittal_only_study(out_dir: str | Path, *, seed: int = 0, transfer_syntax: str = "explicit_little",
                             include_localizer: bool = True, body_part: str = "LSPINE") -> SyntheticStudy:
    """A lumbar study with a sagittal T2 (and a localizer) but no axial series: nothing to analyse.

    ``t2_series_uid`` is the sagittal T2's UID and ``stacks`` is empty.
    """
    root = Path(out_dir)
    phantom = LumbarPhantom(seed)
    study = _lumbar_study_info(seed)
    centre = (0.0, phantom.spine_y0 + 25.0, 0.0)
    uid, paths = _sagittal_t2(root, phantom, study, body_part, centre, transfer_syntax)
    result = SyntheticStudy(root=root, seed=seed, study_uid=study.study_instance_uid, t2_series_uid=uid, stacks=[],
                            t2_paths=paths, target_fat_fractions=phantom.target_fat_fractions,
                            transfer_syntax=transfer_syntax)
    if include_localizer:
        uid, paths = _localizer(root, phantom, study, body_part, centre, transfer_syntax)
        result.distractor_series_uids["localizer"], result.distractor_paths["localizer"] = uid, paths
    return result


def make_brain_study(out_dir: str | Path, *, seed: int = 0, rows: int = 256, cols: int = 256, n_slices: int = 20,
                     pixel_spacing: tuple[float, float] = (0.9, 0.9), slice_spacing: float = 5.5,
                     transfer_syntax: str = "explicit_little", body_part: str = "BRAIN") -> SyntheticStudy:
    """An axial T2 of a head (StudyDescription "MRI BRAIN", BodyPartExamined BRAIN) that must be rejected.

    The series is deliberately named "t2_tse_tra" with lumbar-like TE/TR, so only
    the study/body part tells it apart. ``stacks`` holds one stack with all-zero labels.
    """
    root = Path(out_dir)
    phantom = HeadPhantom(seed)
    study = StudyInfo(patient_name=f"PHANTOM^HEAD{seed}", patient_id=f"HEAD{seed:04d}",
                      accession_number=f"SYNH{seed:04d}", study_description="MRI BRAIN")
    geometry = axial_stack_geometry(n_slices, rows, cols, pixel_spacing, slice_spacing, origin_lps=(0.0, 0.0, 0.0),
                                    slice_thickness=0.9 * slice_spacing)
    info = _t2_series(body_part, number=2)
    rendering = phantom.render(geometry, contrast="t2")
    pixels = _to_uint16(rendering.image)
    uids = [generate_uid() for _ in range(n_slices)]
    paths = _write(root, pixels, geometry, study, info, transfer_syntax, uids)
    stack = StackTruth(sop_instance_uids=uids, paths=paths, geometry=geometry, labels=rendering.labels, image=pixels,
                       fat_mask=rendering.fat_mask, fat_fractions={})
    return SyntheticStudy(root=root, seed=seed, study_uid=study.study_instance_uid,
                          t2_series_uid=info.series_instance_uid, stacks=[stack], t2_paths=paths,
                          target_fat_fractions={}, transfer_syntax=transfer_syntax)


def _write_truth(study: SyntheticStudy, truth_dir: Path) -> None:
    """Labels, fat masks and images per stack (.npz) plus summary.json, kept apart from the DICOM folder."""
    truth_dir.mkdir(parents=True, exist_ok=True)
    for i, stack in enumerate(study.stacks):
        np.savez_compressed(truth_dir / f"stack{i}.npz", labels=stack.labels, fat_mask=stack.fat_mask,
                            image=stack.image, positions=stack.geometry.positions,
                            orientations=stack.geometry.orientations, pixel_spacing=np.array(stack.geometry.pixel_spacing))
    (truth_dir / "summary.json").write_text(json.dumps(study.summary(), indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paraspinal.synthetic_study",
                                     description="Write a synthetic lumbar MR study (DICOM) and print its truth summary.")
    parser.add_argument("out_dir", type=Path, help="folder for the DICOM series (one sub-folder per series)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oblique", action="store_true", help="3 disc-angled stacks in one T2 series")
    parser.add_argument("--transfer-syntax", default="explicit_little", choices=sorted(TRANSFER_SYNTAXES))
    parser.add_argument("--flip", action="store_true", help="rows anterior, columns to the right, slices to the feet")
    parser.add_argument("--non-square", action="store_true", help="PixelSpacing 0.8 x 0.6 mm")
    parser.add_argument("--no-distractors", action="store_true", help="only the axial T2 series")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--kind", choices=("lumbar", "sagittal-only", "brain"), default="lumbar")
    parser.add_argument("--level-seg", action="store_true",
                        help="add a sagittal T2 and a SEG labelling its vertebrae and discs (lumbar levels)")
    parser.add_argument("--truth-dir", type=Path, help="also write labels/fat masks (.npz) and summary.json here")
    args = parser.parse_args(argv)
    if args.kind == "brain":
        study = make_brain_study(args.out_dir, seed=args.seed, transfer_syntax=args.transfer_syntax)
    elif args.kind == "sagittal-only":
        study = make_sagittal_only_study(args.out_dir, seed=args.seed, transfer_syntax=args.transfer_syntax)
    else:
        study = make_synthetic_study(args.out_dir, seed=args.seed, rows=args.rows, cols=args.cols, n_slices=args.slices,
                                     oblique_stacks=args.oblique, non_square_pixels=args.non_square, flip=args.flip,
                                     transfer_syntax=args.transfer_syntax, include_distractors=not args.no_distractors,
                                     level_seg=args.level_seg)
    if args.truth_dir:
        _write_truth(study, args.truth_dir)
    summary = study.summary()
    summary.pop("stacks")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
