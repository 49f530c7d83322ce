"""Shared fixtures: the model bundle, the configuration, real cases written as DICOM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from paraspinal.nifti_to_dicom import DEFAULT_REAL_DATA_DIR as REAL_DATA  # noqa: E402 (after sys.path)
# The shipped bundle; PARASPINAL_TEST_MODEL points the suite at another one.
MODEL_PATH = Path(os.environ.get("PARASPINAL_TEST_MODEL", ROOT / "models"))


@pytest.fixture(scope="session")
def config():
    from app.config import load_config

    return load_config(environ={})


@pytest.fixture(scope="session")
def bundle():
    from paraspinal.model_bundle import load_bundle

    return load_bundle(MODEL_PATH, "cpu")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "musclemap_sub0001_image.nii.gz").is_file():
        pytest.fail(f"real MRI fixtures not found at {REAL_DATA} (see shared/data/README.md)")
    return REAL_DATA
