"""``python -m app model list|promote|rollback``: which model version the node uses.

The node analyses each study with the version active when the study is claimed
(:class:`paraspinal.model_registry.ModelRegistry`), so these commands take effect between
studies, without a restart. Promotions and rollbacks are written to the node's audit log
(``model_promoted``, ``model_rolled_back``), with the gate's decision of the version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.config import Config
from app.node.audit import AuditLog
from app.node.service import audit_path
from paraspinal.model_registry import ModelRegistry, ModelVersion, RegistryError


def _gate_text(version: ModelVersion) -> str:
    if version.shipped:
        return "shipped"
    gate = version.gate or {}
    mean = gate.get("mean") or {}
    text = f"gate {gate.get('decision', 'none')}"
    if mean:
        text += f" (mean Dice {mean.get('current', 0):.3f} -> {mean.get('candidate', 0):.3f})"
    if gate.get("reasons"):
        text += ": " + "; ".join(gate["reasons"])
    return text


def list_versions(registry: ModelRegistry) -> str:
    """One line per version: active mark, version, gate result, folder."""
    active = registry.active()
    lines = []
    for version in registry.versions():
        mark = "*" if version.path.resolve() == active.path.resolve() else " "
        lines.append(f"{mark} {version.version:<22} {_gate_text(version)}  [{version.path}]")
    return "\n".join(lines)


def record_switch(config: Config, event: str, previous: str, current: str, registry: ModelRegistry,
                  **fields: object) -> None:
    """Write a promotion or rollback to the node's audit log."""
    audit = AuditLog(audit_path(config.node))
    try:
        target = registry.find(current)
        audit.write(event, previous=previous, version=current, gate=(target.gate or {}).get("decision", "shipped"),
                    **fields)
    finally:
        audit.close()


def cmd_model(args: argparse.Namespace, config: Config, shipped: Path) -> int:
    registry = ModelRegistry(shipped, config.learning.models_dir)
    try:
        if args.action == "list":
            print(list_versions(registry))
            return 0
        if args.action == "promote":
            previous, current = registry.promote(args.version, force=args.force,
                                                 why="promote (forced)" if args.force else "promote")
            record_switch(config, "model_promoted", previous, current, registry, forced=bool(args.force),
                          by="python -m app model promote")
        else:
            previous, current = registry.rollback()
            record_switch(config, "model_rolled_back", previous, current, registry, by="python -m app model rollback")
    except RegistryError as exc:
        print(f"error: {exc}")
        return 2
    print(f"active model: {current} (was {previous}); the node uses it from the next study")
    return 0
