"""Benchmark inputs, written once and cached under ``build/bench/data``.

* ``syn512``: synthetic lumbar axial T2, 512 x 512 x 50, 0.5 mm pixels (a 256 mm field of view,
  as a lumbar axial T2 is acquired), 4.4 mm slice step, explicit VR little endian, T2 series only;
* ``tiny``: synthetic, 128 x 128 x 4 (the smoke test's input);
* ``musclemap_sub0001``, ``myosegmentum_tum01``: the real shared cases as DICOM
  (:func:`paraspinal.nifti_to_dicom.real_case_series`).

:func:`clone_study` copies a study with new Study/Series/SOP Instance UIDs (pixel data
untouched), so a node sees new instances on every run and several senders send different studies.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom

from benchmarks.machine import ROOT

DATA_DIR = ROOT / "build" / "bench" / "data"

#: name -> parameters of make_synthetic_study (synthetic) or the real case name.
SYNTHETIC = {
    "syn512": dict(seed=0, rows=512, cols=512, n_slices=50, pixel_spacing=(0.5, 0.5), include_distractors=False),
    "tiny": dict(seed=1, rows=128, cols=128, n_slices=4, include_distractors=False),
}
REAL = ("musclemap_sub0001", "myosegmentum_tum01")


@dataclass
class BenchStudy:
    name: str
    folder: Path
    paths: list[Path]
    study_uid: str
    description: str

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def _describe(name: str) -> str:
    if name in SYNTHETIC:
        p = SYNTHETIC[name]
        return (f"synthetic {p['rows']}x{p['cols']}x{p['n_slices']}, "
                f"{p.get('pixel_spacing', (0.9375, 0.9375))[0]} mm pixels, seed {p['seed']}")
    return f"real case {name} (NIfTI written as DICOM)"


def get_study(name: str, data_dir: Path = DATA_DIR) -> BenchStudy:
    """The study ``name``, written on first use (a marker file says it is complete)."""
    base = Path(data_dir) / name
    folder = base / "dicom"  # the DICOM files only: the pipeline's input folder
    marker = base / "bench_dataset.json"
    params = SYNTHETIC.get(name, {"real": name})
    wanted = json.dumps(params, sort_keys=True, default=list)
    if marker.is_file() and json.loads(marker.read_text()).get("params") == wanted:
        info = json.loads(marker.read_text())
        paths = [folder / p for p in info["paths"]]
        return BenchStudy(name, folder, paths, info["study_uid"], _describe(name))
    shutil.rmtree(base, ignore_errors=True)
    files = folder
    if name in SYNTHETIC:
        from paraspinal.synthetic_study import make_synthetic_study

        study = make_synthetic_study(files, **params)
        paths, study_uid = list(study.all_paths), study.study_uid
    elif name in REAL:
        from paraspinal.nifti_to_dicom import real_case_series

        case = real_case_series(name, files)
        paths, study_uid = list(case.paths), case.study_uid
    else:
        raise ValueError(f"unknown benchmark study {name!r}; known: {', '.join([*SYNTHETIC, *REAL])}")
    marker.write_text(json.dumps({"params": wanted, "study_uid": study_uid,
                                  "paths": [str(p.relative_to(folder)) for p in paths]}, indent=1))
    return BenchStudy(name, folder, paths, study_uid, _describe(name))


def _derived_uid(*parts: str) -> str:
    """A 2.25 UID determined by ``parts`` (128 bits of their SHA-256)."""
    return "2.25." + str(int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:32], 16))


def clone_study(study: BenchStudy, out_dir: Path, tag: str) -> BenchStudy:
    """A copy of ``study`` with UIDs derived from ``tag`` (same tag, same UIDs); pixel data as is."""
    out_dir = Path(out_dir)
    marker = out_dir.parent / f"{out_dir.name}.bench_clone.json"
    key = hashlib.sha256(f"{study.folder}|{study.study_uid}|{tag}".encode()).hexdigest()
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        info = json.loads(marker.read_text())
        return BenchStudy(f"{study.name}#{tag}", out_dir, [out_dir / p for p in info["paths"]], info["study_uid"],
                          study.description)
    shutil.rmtree(out_dir, ignore_errors=True)
    marker.unlink(missing_ok=True)
    out_dir.mkdir(parents=True)
    study_uid = _derived_uid(study.study_uid, tag)
    paths = []
    for i, path in enumerate(study.paths):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = _derived_uid(str(ds.SeriesInstanceUID), tag)
        ds.SOPInstanceUID = _derived_uid(str(ds.SOPInstanceUID), tag)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out_dir / f"{i:05d}.dcm"
        ds.save_as(target)
        paths.append(target)
    marker.write_text(json.dumps({"key": key, "study_uid": study_uid, "paths": [p.name for p in paths]}))
    return BenchStudy(f"{study.name}#{tag}", out_dir, paths, study_uid, study.description)
