"""The node's configuration: one YAML file, a site file over it, environment overrides last.

Order of precedence (later wins):
1. ``config/default.yaml`` shipped with the application,
2. a site file passed with ``--config`` or named by ``PARASPINAL_CONFIG``,
3. environment variables ``PARASPINAL__<SECTION>__<KEY>`` (values parsed as YAML,
   so ``PARASPINAL__NODE__PORT=104`` is an int and ``...__ALLOWED_PEERS=[]`` a list).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

# The settings domain code reads live beside it (paraspinal never imports app); re-exported here.
from paraspinal.quality import QualityError, QualitySettings
from paraspinal.settings import (RESEARCH_USE_STATEMENT, OutputSettings, QuantificationSettings,  # noqa: F401
                                 SelectionRules, SettingsError)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "default.yaml"
DEFAULT_MODEL_PATH = PROJECT_ROOT / "models"
ENV_PREFIX = "PARASPINAL__"
class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class PeerAddress:
    """A DICOM application entity reachable over TCP (``tls``: associate over DICOM TLS,
    with the node's certificate as client certificate). As a destination: ``kind: dimse``
    (the default), results go by C-STORE."""

    ae_title: str
    host: str
    port: int = 104
    tls: bool = False
    kind: str = "dimse"

    def __post_init__(self) -> None:
        if self.kind != "dimse":
            raise ConfigError(f"destination {self.ae_title!r}: kind {self.kind!r} is not dimse or dicomweb")

    @property
    def outbox_key(self) -> str:
        """How the outbox names this destination: ``AE@host:port``."""
        return f"{self.ae_title}@{self.host}:{self.port}"


DICOMWEB_KEY_PREFIX = "dicomweb:"


@dataclass(frozen=True)
class DicomwebDestination:
    """A DICOMweb service results are stored to by STOW-RS (``kind: dicomweb``).

    Attributes:
        url: the service root, e.g. ``https://pacs.example.org/dicom-web`` (``/studies`` is appended).
        auth_header_file: a file holding one HTTP header line sent with every request, e.g.
            ``Authorization: Basic ...`` or ``Authorization: Bearer ...`` (read at each send, so a
            rotated credential is picked up without a restart).
        token_file: a file holding a bearer token; sent as ``Authorization: Bearer <token>``.
        ca_bundle: PEM file of the CAs that sign the service's HTTPS certificate (empty: the
            system's trust store).
        timeout_s: connect and read timeout of one request, s.
    """

    url: str
    auth_header_file: Path | None = None
    token_file: Path | None = None
    ca_bundle: Path | None = None
    timeout_s: float = 60.0
    kind: str = "dicomweb"

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"dicomweb destination: url {self.url!r} is not http:// or https://")
        if self.auth_header_file and self.token_file:
            raise ConfigError(f"dicomweb destination {self.url}: give auth_header_file or token_file, not both")
        if self.timeout_s <= 0:
            raise ConfigError(f"dicomweb destination {self.url}: timeout_s must be > 0")

    @property
    def outbox_key(self) -> str:
        """How the outbox names this destination: ``dicomweb:<url>``."""
        return DICOMWEB_KEY_PREFIX + self.url.rstrip("/")


Destination = PeerAddress | DicomwebDestination


def destination_from_mapping(values: Mapping[str, Any], base_dir: Path) -> Destination:
    """One ``destinations`` entry: ``kind: dicomweb`` (STOW-RS) or ``kind: dimse`` / no kind (C-STORE).
    Relative file paths resolve against ``base_dir``."""
    values = dict(values)
    kind = str(values.get("kind", "dimse"))
    if kind != "dicomweb":
        return PeerAddress(**values)
    for name in ("auth_header_file", "token_file", "ca_bundle"):
        value = values.get(name)
        if value in (None, ""):
            values[name] = None
        else:
            path = Path(str(value))
            values[name] = path if path.is_absolute() else base_dir / path
    if "timeout_s" in values:
        values["timeout_s"] = float(values["timeout_s"])
    return DicomwebDestination(**values)


@dataclass(frozen=True)
class AllowedPeer:
    """A calling peer allowed to associate; ``host`` empty means any address.

    With DICOM TLS on, the peer's AE title can be bound to its client certificate: by the
    certificate subject's common name (``tls_subject_cn``) and/or the SHA-256 fingerprint of
    the certificate (``tls_sha256``, hex, colons and case ignored). A bound AE title is then
    admitted only with that certificate, and that certificate only with that AE title."""

    ae_title: str
    host: str = ""
    tls_subject_cn: str = ""
    tls_sha256: str = ""

    @property
    def tls_bound(self) -> bool:
        return bool(self.tls_subject_cn or self.tls_sha256)


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str
    bind_address: str
    port: int
    allowed_peers: tuple[AllowedPeer, ...]
    max_associations: int
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    quiet_period_s: float
    spool_dir: Path
    state_db: Path
    results_dir: Path
    failed_dir: Path
    workers: int
    min_free_disk_mb: int
    destinations: tuple[Destination, ...]
    send_retries: int
    send_backoff_s: float
    send_backoff_max_s: float
    max_pdu_size: int
    max_dataset_mb: float
    tls_enabled: bool
    tls_certificate: Path | None
    tls_private_key: Path | None
    tls_ca_certificates: Path | None
    tls_require_client_certificate: bool
    health_check_ae_title: str
    health_max_heartbeat_age_s: float
    audit_log: Path | None
    log_uids: str
    analysis_timeout_s: float
    shutdown_grace_s: float
    retention_days: float
    retention_check_interval_s: float

    def __post_init__(self) -> None:
        if self.retention_days < 0 or self.retention_check_interval_s <= 0:
            raise ConfigError("[node] retention_days must be >= 0 (0: keep forever) and "
                              "retention_check_interval_s > 0")
        if self.log_uids not in ("clear", "hashed"):
            raise ConfigError(f"[node] log_uids: {self.log_uids!r} is not one of clear, hashed")
        if self.tls_enabled and not (self.tls_certificate and self.tls_private_key):
            raise ConfigError("[node] tls_enabled needs tls_certificate and tls_private_key")
        if self.tls_enabled and self.tls_require_client_certificate and not self.tls_ca_certificates:
            raise ConfigError("[node] tls_require_client_certificate needs tls_ca_certificates (the CAs that "
                              "sign the peers' certificates)")
        tls_destination = any(getattr(d, "tls", False) for d in self.destinations)
        if tls_destination and not (self.tls_certificate and self.tls_private_key and self.tls_ca_certificates):
            raise ConfigError("[node] a destination with tls: true needs tls_certificate, tls_private_key and "
                              "tls_ca_certificates")


@dataclass(frozen=True)
class LearningSettings:
    """The site teaches the model (README "The site teaches the model"; ``learning:`` section).

    Attributes:
        corrections: accept corrected muscle SEGs sent back to the node as training cases.
        site_dir: the site dataset (cases/<id>/ image + label NIfTI and provenance JSON).
        site_quota_mb: disk quota of the site dataset, MiB; a case beyond it is refused.
        refused_dir: refused corrections are kept here with their reason (never trained on).
        models_dir: site model versions and the ``active.json`` pointer.
        finetune_after: the node fine-tunes itself after this many new corrections, when idle,
            at low priority (0: never; ``python -m training.finetune`` by hand).
        finetune_iterations, finetune_batch_size: length of a fine-tune (2D slice batches).
        finetune_lr: AdamW learning rate of a fine-tune.
        gate_max_drop: the gate refuses a candidate when any muscle's held-out Dice falls by
            more than this (absolute Dice) against the current model.
        gate_holdout_fraction: share of site patients held out for the gate (at least one).
    """

    corrections: bool = True
    site_dir: Path = Path("var/site")
    site_quota_mb: float = 2048.0
    refused_dir: Path = Path("var/corrections_refused")
    models_dir: Path = Path("var/models")
    finetune_after: int = 0
    finetune_iterations: int = 200
    finetune_batch_size: int = 4
    finetune_lr: float = 3e-4
    gate_max_drop: float = 0.02
    gate_holdout_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.site_quota_mb <= 0 or self.finetune_after < 0 or self.finetune_iterations < 1:
            raise ConfigError("[learning] site_quota_mb must be > 0, finetune_after >= 0, finetune_iterations >= 1")
        if not 0.0 < self.gate_holdout_fraction < 1.0 or self.gate_max_drop < 0:
            raise ConfigError("[learning] gate_holdout_fraction must be within (0, 1) and gate_max_drop >= 0")


@dataclass(frozen=True)
class Config:
    selection: SelectionRules
    quantification: QuantificationSettings
    output: OutputSettings
    node: NodeSettings
    quality: QualitySettings = field(default_factory=QualitySettings)
    learning: LearningSettings = field(default_factory=LearningSettings)
    source: tuple[str, ...] = field(default=())  # files and env keys it was built from


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_env(raw: dict, environ: Mapping[str, str]) -> tuple[dict, list[str]]:
    used = []
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if len(path) < 2:
            raise ConfigError(f"{name}: expected PARASPINAL__<SECTION>__<KEY>")
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{name}: unknown section {'.'.join(path[:-1])!r}")
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(f"{name}: unknown key {'.'.join(path)!r}")
        node[path[-1]] = yaml.safe_load(text)
        used.append(name)
    return raw, used


def _build(cls: type, section: str, values: Mapping[str, Any], base_dir: Path) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s): {', '.join(sorted(unknown))}")
    missing = set(known) - set(values)
    if missing:
        raise ConfigError(f"[{section}] missing key(s): {', '.join(sorted(missing))}")
    kwargs = {}
    for name, value in values.items():
        annotation = str(known[name].type)
        try:
            if annotation == "Path":
                path = Path(str(value))
                kwargs[name] = path if path.is_absolute() else base_dir / path
            elif annotation == "Path | None":  # empty or null: not set
                path = Path(str(value)) if value not in (None, "") else None
                kwargs[name] = None if path is None else path if path.is_absolute() else base_dir / path
            elif annotation == "bool":
                if isinstance(value, bool):
                    kwargs[name] = value
                elif str(value).strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                    kwargs[name] = str(value).strip().lower() in ("true", "yes", "on", "1")
                else:
                    raise ValueError(f"{value!r} is not a boolean")
            elif annotation.startswith("tuple[str"):
                kwargs[name] = tuple(str(v) for v in (value or []))
            elif annotation == "tuple[Destination, ...]":
                kwargs[name] = tuple(destination_from_mapping(v, base_dir) for v in (value or []))
            elif annotation == "tuple[AllowedPeer, ...]":
                kwargs[name] = tuple(AllowedPeer(**dict(v)) for v in (value or []))
            elif annotation == "int":
                kwargs[name] = int(value)
            elif annotation == "float":
                kwargs[name] = float(value)
            else:
                kwargs[name] = str(value) if value is not None else ""
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[{section}] {name}: {exc}") from exc
    try:
        return cls(**kwargs)
    except SettingsError as exc:  # a domain settings type's own validation (paraspinal.settings)
        raise ConfigError(str(exc)) from exc


def _build_quality(values: Mapping[str, Any]) -> QualitySettings:
    """The ``quality`` section (thresholds of the review flag, :mod:`paraspinal.quality`)."""
    known = {f.name for f in fields(QualitySettings)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"[quality] unknown key(s): {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    try:
        for name, value in values.items():
            if name == "max_csa_range_mm2":
                if not isinstance(value, Mapping):
                    raise ValueError(f"{value!r} is not a mapping of muscle -> [low, high]")
                kwargs[name] = {str(m): (float(b[0]), float(b[1])) for m, b in value.items()}
            elif name == "always_present":
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise ValueError(f"always_present: {value!r} is not a list of muscle names")
                kwargs[name] = tuple(str(m) for m in value)
            else:
                kwargs[name] = float(value)
        return QualitySettings(**kwargs)
    except (TypeError, ValueError, IndexError, QualityError) as exc:
        raise ConfigError(f"[quality] {exc}") from exc


def load_config(
    site_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Load the configuration.

    Args:
        site_file: optional YAML merged over the defaults (else ``$PARASPINAL_CONFIG``).
        environ: environment to read overrides from (default ``os.environ``).
        base_dir: directory that relative paths (spool, database) resolve against;
            defaults to the current working directory.
    """
    environ = os.environ if environ is None else environ
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    sources = [str(DEFAULT_CONFIG_PATH)]
    site_file = site_file or environ.get("PARASPINAL_CONFIG")
    if site_file:
        site = yaml.safe_load(Path(site_file).read_text()) or {}
        if not isinstance(site, dict):
            raise ConfigError(f"{site_file}: top level must be a mapping")
        unknown = set(site) - set(raw)
        if unknown:
            raise ConfigError(f"{site_file}: unknown section(s): {', '.join(sorted(unknown))}")
        raw = _deep_merge(raw, site)
        sources.append(str(site_file))
    raw, used = _apply_env(raw, environ)
    base = Path.cwd() if base_dir is None else base_dir
    return Config(
        selection=_build(SelectionRules, "selection", raw["selection"], base),
        quantification=_build(QuantificationSettings, "quantification", raw["quantification"], base),
        output=_build(OutputSettings, "output", raw["output"], base),
        node=_build(NodeSettings, "node", raw["node"], base),
        quality=_build_quality(raw.get("quality") or {}),
        learning=_build(LearningSettings, "learning", raw["learning"], base),
        source=tuple(sources + used),
    )
