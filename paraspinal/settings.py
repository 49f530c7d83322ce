"""Settings and statements the domain code reads; loaded and validated by ``app.config``
(one YAML file, ``config/default.yaml``), defined here so that ``paraspinal`` never imports ``app``."""

from __future__ import annotations

from dataclasses import dataclass

RESEARCH_USE_STATEMENT = (
    "RESEARCH USE ONLY. Not a medical device; not validated for clinical use. "
    "Results are produced automatically and must be reviewed by a qualified reader."
)


@dataclass(frozen=True)
class SelectionRules:
    """Rules that pick the lumbar axial T2 series out of a study."""

    axial_max_angle_deg: float
    min_echo_time_ms: float
    min_repetition_time_ms: float
    min_slices_per_stack: int
    excluded_image_types: tuple[str, ...]
    excluded_body_parts: tuple[str, ...]
    preferred_description_words: tuple[str, ...]
    avoided_description_words: tuple[str, ...]
    stack_orientation_tolerance_deg: float
    # Fat-suppressed (ScanOptions FS, spectral fat suppression) and inversion-recovery (STIR,
    # SPAIR, FLAIR) series are never analysed: fat cannot be measured on them and the model
    # was trained on T2 without fat suppression.
    exclude_fat_suppressed: bool = True


@dataclass(frozen=True)
class OutputSettings:
    """Series numbers, descriptions and device identity of the SEG, SR and report written."""

    seg_series_number: int
    sr_series_number: int
    report_series_number: int
    seg_series_description: str
    sr_series_description: str
    manufacturer: str
    manufacturer_model_name: str
    institution_name: str
    # The SR holding only the muscle outlines (what OHIF and most PACS viewers can show).
    viewer_sr_series_number: int = 9004
    viewer_sr_series_description: str = "Paraspinal muscle outlines (research use)"
