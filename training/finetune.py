"""Fine-tune the active model on the site's corrections and let the gate decide.

    python -m training.finetune --site var/site [--config site.yaml] [--iterations 200]
        [--real-cases musclemap_sub0001 myosegmentum_tum01 | --real-cases] [--no-promote]

1. The site cases (:mod:`paraspinal.site_dataset`) are split by patient: a share of the
   patients (``learning.gate_holdout_fraction``, at least one) is held out for the gate, the
   rest is trained on together with the shipped real data (``--real-cases``), each case
   with only the labels it annotates (marginal loss, partial labels).
2. Training starts from the active bundle's weights (:func:`training.train.train`,
   ``--init``), in one CPU thread (``--threads``), with the usual recipe at a lower learning
   rate.
3. The candidate is written as a new site version ``<base>+site.<n>`` under
   ``learning.models_dir`` (the shipped bundle is never touched; earlier versions are kept),
   and the gate (:mod:`training.gate`) compares it with the active model on the held-out
   patients. The model card gets the data counts, the comparison table and the decision.
4. Only when the gate says ``promote`` (and ``--no-promote`` is not given) does the version
   become active, audited as ``model_promoted``; the node uses it from its next study.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from app.config import DEFAULT_MODEL_PATH, Config, load_config
from app.model_versions import record_switch
from app.node.audit import utc_iso
from paraspinal.model_bundle import read_metadata
from paraspinal.model_registry import ModelRegistry
from paraspinal.site_dataset import SiteCase, list_cases
from training.data import CaseError, site_cases
from training.export import add_recipe_check, export_bundle, write_metadata
from training.gate import GateResult, compare
from training.network import context_slices_of
from training.train import TrainConfig, train

STATE_FILE = "finetune_state.json"


def split_by_patient(cases: Sequence[SiteCase], holdout_fraction: float, seed: int = 0
                     ) -> tuple[list[SiteCase], list[SiteCase]]:
    """(training cases, held-out cases): whole patients on one side only.

    Patients are ordered by a seeded hash of their key (stable as cases accumulate: a patient
    held out once stays held out for the same seed); ``round(fraction * patients)`` of them, at
    least one, are held out when there are two patients or more, none otherwise."""
    patients = sorted({c.patient_key for c in cases},
                      key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    if len(patients) < 2:
        return list(cases), []
    n_held = min(len(patients) - 1, max(1, round(holdout_fraction * len(patients))))
    held = set(patients[:n_held])
    return [c for c in cases if c.patient_key not in held], [c for c in cases if c.patient_key in held]


def finetune(site_dir: Path, config: Config, shipped: Path, *, iterations: int, batch_size: int, lr: float,
             real_cases: Sequence[str], max_drop: float, holdout_fraction: float, promote: bool = True,
             threads: int = 1, seed: int = 0, work_dir: Path | None = None, progress: bool = False
             ) -> dict[str, Any]:
    """Fine-tune, write the candidate version, run the gate, promote on success; returns a summary."""
    registry = ModelRegistry(shipped, config.learning.models_dir)
    current = registry.active()
    cases = list_cases(site_dir)
    if not cases:
        raise CaseError(f"{site_dir}: no site cases yet")
    train_cases, held_out = split_by_patient(cases, holdout_fraction, seed)
    if not train_cases and not real_cases:
        raise CaseError("nothing to train on: every site case is held out and no real case is given")
    version = registry.next_version(current.version)
    metadata_current = read_metadata(current.path)
    name = str(metadata_current.get("name", "paraspinal_t2ax"))
    work = Path(work_dir) if work_dir else Path(config.learning.models_dir) / ".work" / version
    net = metadata_current.get("network_def", {})
    train_config = TrainConfig(
        out=str(work), cases=list(real_cases), holdout=[f"site:{c.case_id}" for c in held_out],
        data_dir=str(site_dir) if train_cases else None, iterations=iterations, batch_size=batch_size, lr=lr,
        side_agnostic=0.5, channels=list(net.get("channels", [16, 32, 64, 128, 256])), head=bool(net.get("head")),
        context_slices=context_slices_of(net), seed=seed, checkpoint_every=min(100, iterations), threads=threads, init_checkpoint=str(current.path))
    torch.set_num_threads(max(1, threads))
    started = time.monotonic()
    cpu0 = time.process_time()
    checkpoint = train(train_config, progress=progress)
    train_s, train_cpu_s = time.monotonic() - started, time.process_time() - cpu0
    candidate_dir = Path(config.learning.models_dir) / f"{name}-{version}"
    export_bundle(checkpoint, candidate_dir, version=version, name=name,
                  test_time_mirror=bool(metadata_current.get("inference", {}).get("test_time_mirror", False)))

    started, cpu0 = time.monotonic(), time.process_time()
    registry_cases = site_cases(Path(site_dir))
    loaded = [registry_cases[f"site:{c.case_id}"].load() for c in held_out]
    gate: GateResult = compare(candidate_dir, current.path, loaded, max_drop)
    gate_s, gate_cpu_s = time.monotonic() - started, time.process_time() - cpu0

    checkpoint_data = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    data = {
        "site_cases": len(cases), "site_patients": len({c.patient_key for c in cases}),
        "train_site_cases": len(train_cases), "held_out_site_cases": len(held_out),
        "held_out_patients": len({c.patient_key for c in held_out}),
        "real_cases": list(real_cases), "training_slices": int(checkpoint_data["num_slices"]),
        "per_case": checkpoint_data["data"],
    }
    summary = {
        "base_version": current.version, "version": version, "created_at": utc_iso(), "data": data,
        "recipe": {"iterations": iterations, "batch_size": batch_size, "lr": lr, "threads": threads, "seed": seed,
                   "init": current.version},
        "cost": {"train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1), "gate_s": round(gate_s, 1),
                 "gate_cpu_s": round(gate_cpu_s, 1)},
        "gate": gate.as_dict(),
    }
    metadata = read_metadata(candidate_dir)
    metadata["site_finetune"] = summary
    metadata["description"] = (f"Site fine-tune of {name} {current.version} on {len(train_cases)} site "
                               f"correction(s) plus {', '.join(real_cases) or 'no shipped real case'}. "
                               "Research use only.")
    add_recipe_check(metadata, "Site fine-tune gate", (
        f"Fine-tuned from {current.version} for {iterations} iterations (batch {batch_size}, lr {lr:g}, "
        f"{threads} CPU thread(s), {train_s:.0f} s). Data: {len(train_cases)} site case(s) of "
        f"{data['site_patients'] - data['held_out_patients']} patient(s) for training, {len(held_out)} case(s) of "
        f"{data['held_out_patients']} patient(s) held out for the gate; shipped real cases: "
        f"{', '.join(real_cases) or 'none'}; {data['training_slices']} training slices.\n\n"
        f"Held-out Dice (post-processed), current {current.version} vs candidate {version}:\n\n"
        f"{gate.table_markdown()}\n\n**Decision: {gate.decision}** — {'; '.join(gate.reasons)}."))
    write_metadata(candidate_dir, metadata)

    promoted = False
    if promote and gate.decision == "promote":
        previous, now = registry.promote(version, why="gate")
        record_switch(config, "model_promoted", previous, now, registry, by="training.finetune gate",
                      mean_dice=gate.mean)
        promoted = True
    (Path(site_dir) / STATE_FILE).write_text(json.dumps({
        "cases_at_last_finetune": len(cases), "at": utc_iso(), "version": version, "decision": gate.decision,
        "promoted": promoted}, indent=2) + "\n")
    return {**summary, "path": str(candidate_dir), "promoted": promoted}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, help="site dataset folder (default: learning.site_dir)")
    p.add_argument("--config", help="node configuration YAML (learning section; default: $PARASPINAL_CONFIG)")
    p.add_argument("-m", "--model", type=Path, default=DEFAULT_MODEL_PATH, help="the shipped bundle or models folder")
    p.add_argument("--iterations", type=int, help="default: learning.finetune_iterations")
    p.add_argument("--batch-size", type=int, help="default: learning.finetune_batch_size")
    p.add_argument("--lr", type=float, help="default: learning.finetune_lr")
    p.add_argument("--real-cases", nargs="*", default=["musclemap_sub0001", "myosegmentum_tum01"],
                   help="shipped real cases trained on beside the site cases (none: give the flag alone)")
    p.add_argument("--max-drop", type=float, help="default: learning.gate_max_drop")
    p.add_argument("--holdout-fraction", type=float, help="default: learning.gate_holdout_fraction")
    p.add_argument("--no-promote", action="store_true", help="write the candidate and the gate result only")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the node's machine analyses too)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, help="training run folder (default: <models_dir>/.work/<version>)")
    args = p.parse_args(argv)
    config = load_config(args.config)
    learning = config.learning
    try:
        summary = finetune(
            args.site or learning.site_dir, config, args.model,
            iterations=args.iterations or learning.finetune_iterations,
            batch_size=args.batch_size or learning.finetune_batch_size, lr=args.lr or learning.finetune_lr,
            real_cases=args.real_cases,
            max_drop=learning.gate_max_drop if args.max_drop is None else args.max_drop,
            holdout_fraction=args.holdout_fraction or learning.gate_holdout_fraction, promote=not args.no_promote,
            threads=args.threads, seed=args.seed, work_dir=args.work_dir, progress=sys.stderr.isatty())
    except CaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gate = summary["gate"]
    print(json.dumps({"version": summary["version"], "path": summary["path"], "decision": gate["decision"],
                      "reasons": gate["reasons"], "mean": gate["mean"], "promoted": summary["promoted"],
                      "cost": summary["cost"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
