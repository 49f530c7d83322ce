"""One configuration file, a site file over it, environment overrides last; bad keys fail early."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_config
from tests.conftest import ROOT


def test_defaults_load_with_documented_selection_thresholds():
    config = load_config(environ={})
    assert config.selection.min_echo_time_ms == 60.0
    assert config.selection.min_repetition_time_ms == 1500.0
    assert config.node.quiet_period_s == 10.0


def test_site_file_and_environment_override_in_that_order(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("node:\n  port: 104\n  ae_title: SITEAE\n")
    config = load_config(site, environ={"PARASPINAL__NODE__PORT": "11113",
                                        "PARASPINAL__NODE__DESTINATIONS": "[{ae_title: PACS, host: 127.0.0.1, port: 4242}]"})
    assert config.node.ae_title == "SITEAE"
    assert config.node.port == 11113
    assert config.node.destinations[0].ae_title == "PACS" and config.node.destinations[0].port == 4242


@pytest.mark.parametrize("environ, message", [
    ({"PARASPINAL__NODE__PROT": "1"}, "unknown key 'node.prot'"),
    ({"PARASPINAL__NODES__PORT": "1"}, "unknown section"),
    ({"PARASPINAL__NODE__PORT": "eleven"}, "[node] port"),
])
def test_misspelt_or_mistyped_overrides_fail_with_the_key_named(environ, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(environ=environ)


def test_unknown_section_in_site_file_is_rejected(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("nodes:\n  port: 104\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(site, environ={})


@pytest.mark.parametrize("environ, message", [
    ({"PARASPINAL__QUANTIFICATION__FAT_METHOD": "guess"}, "[quantification] fat_method: 'guess' is not one of"),
    ({"PARASPINAL__QUANTIFICATION__PDFF_EROSION_VOXELS": "11"}, "[quantification] pdff_erosion_voxels: 11"),
])
def test_out_of_range_measurement_settings_fail_as_config_errors_naming_the_key(environ, message):
    # QuantificationSettings validates itself in paraspinal.settings (domain code never imports app);
    # the loader still reports a ConfigError naming the section and key.
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(environ=environ)


def test_domain_code_and_operators_never_import_the_application():
    """Layering: ``app`` wires ``operators`` over ``paraspinal``; configuration types the lower
    layers read live in ``paraspinal.settings`` (and ``paraspinal.quality``), never in ``app``."""
    import ast

    offenders = []
    for package in ("paraspinal", "operators"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "app" or n.startswith("app.")]
    assert offenders == []
