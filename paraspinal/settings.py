"""Settings and statements the domain code reads; loaded and validated by ``app.config``
(one YAML file, ``config/default.yaml``), defined here so that ``paraspinal`` never imports ``app``."""

from __future__ import annotations

from dataclasses import dataclass

RESEARCH_USE_STATEMENT = (
    "RESEARCH USE ONLY. Not a medical device; not validated for clinical use. "
    "Results are produced automatically and must be reviewed by a qualified reader."
)


class SettingsError(ValueError):
    """A setting is out of range (``app.config`` reports it as a ``ConfigError`` naming the section)."""


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


@dataclass(frozen=True)
class QuantificationSettings:
    """How muscles are measured (README "Measurements").

    Attributes:
        fat_method: key of ``paraspinal.fat_methods.FAT_METHODS``.
        bias_correction: ``"n4"`` (SimpleITK N4 before fat separation) or ``"none"``.
        dixon_pdff: ``"auto"`` (PDFF beside the T2 method when the study has Dixon water and fat
            series on the T2's frame of reference) or ``"off"``.
        min_muscle_voxels: muscles with fewer voxels in a stack are reported as not found.
        pdff_erosion_voxels: the Dixon PDFF is measured in each muscle's mask eroded in-plane by
            this many voxels (0: the whole mask; ``paraspinal.quantification.eroded_in_plane``).
    """

    fat_method: str
    bias_correction: str
    dixon_pdff: str
    min_muscle_voxels: int
    pdff_erosion_voxels: int

    def __post_init__(self) -> None:
        from paraspinal.fat_methods import FAT_METHODS  # light: numpy/scipy/scikit-image only

        allowed = {"fat_method": tuple(FAT_METHODS), "bias_correction": ("n4", "none"),
                   "dixon_pdff": ("auto", "off")}
        for name, choices in allowed.items():
            value = getattr(self, name)
            if value not in choices:
                raise SettingsError(f"[quantification] {name}: {value!r} is not one of {', '.join(choices)}")
        if not 0 <= self.pdff_erosion_voxels <= 10:
            raise SettingsError(f"[quantification] pdff_erosion_voxels: {self.pdff_erosion_voxels!r} is not "
                              "between 0 and 10 voxels")
