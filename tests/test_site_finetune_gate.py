"""Offline side of "the site teaches the model": ``training.site add``, a short real fine-tune
and the gate's decision, a deliberately worse candidate refused, versions promoted and rolled back.

Site cases are small synthetic studies (phantoms, 96x96 pixels of 2.5 mm, 6 slices) with
their truth written as a reader's SEG (highdicom), one patient each. Every figure the gate
uses is computed here: both models segment the held-out cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.config import PROJECT_ROOT, load_config
from app.node.audit import read_audit
from paraspinal.model_bundle import find_bundle, load_bundle, parse_labels, read_metadata
from paraspinal.model_registry import ModelRegistry, RegistryError
from paraspinal.site_dataset import list_cases
from paraspinal.synthetic_study import make_synthetic_study
from tests.seg_editing import description, label_of, sorted_series, write_seg
from training.data import site_cases
from training.export import write_bundle
from training.finetune import finetune, split_by_patient
from training.gate import compare
from training.network import build_network
from training.site import main as site_main
from app.__main__ import main as app_main

SHIPPED = find_bundle(PROJECT_ROOT / "models")
LABELS = parse_labels(read_metadata(SHIPPED))
BACK_MUSCLES = ("multifidus right", "multifidus left", "erector spinae right", "erector spinae left")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Four site cases (four patients) added with ``python -m training.site add``."""
    root = tmp_path_factory.mktemp("site")
    site_dir = root / "site"
    for seed in (41, 42, 43, 44):
        study = make_synthetic_study(root / f"study{seed}", seed=seed, rows=96, cols=96, pixel_spacing=(2.5, 2.5),
                                     n_slices=6, include_distractors=False)
        stack = study.stacks[0]
        source = sorted_series(stack.paths)
        for ds in source:  # one patient per study (the synthetic writer may reuse an ID)
            ds.PatientID = f"SYN{seed}"
            ds.save_as(str(Path(ds.filename)))
        infos = [label_of(LABELS, name) for name in BACK_MUSCLES]
        masks = [stack.labels == info.value for info in infos]
        write_seg(source, masks, [description(i + 1, info) for i, info in enumerate(infos)], root / f"seg{seed}.dcm")
        args = ["add", str(root / f"seg{seed}.dcm"), str(study.root), "--site", str(site_dir), "--model", str(SHIPPED)]
        if seed == 41:  # the command as a site runs it, once; the same entry point in-process for the rest
            run = _run("-m", "training.site", *args, cwd=root)
            assert run.returncode == 0, run.stderr
            assert json.loads(run.stdout.splitlines()[-1])["labelled_classes"] == [0, 1, 2, 3, 4]
        else:
            assert site_main(args) == 0
    config_path = root / "site.yaml"
    config_path.write_text(json.dumps({"node": {"state_db": str(root / "node" / "state.sqlite3"),
                                                "audit_log": str(root / "audit.jsonl")},
                                       "learning": {"site_dir": str(site_dir), "models_dir": str(root / "models")}}))
    return {"root": root, "site": site_dir, "config": config_path}


def test_training_site_add_stores_partial_labels_and_no_patient_identifiers(site):
    cases = list_cases(site["site"])
    assert len(cases) == 4 and len({c.patient_key for c in cases}) == 4
    text = "".join(p.read_text() for c in cases for p in c.folder.glob("*.json"))
    assert "SYN4" not in text and "PatientName" not in text
    loaded = site_cases(site["site"])[f"site:{cases[0].case_id}"].load()
    assert loaded.labelled_classes == (0, 1, 2, 3, 4) and set(map(int, set(loaded.label.ravel()))) <= {0, 1, 2, 3, 4}


def test_split_by_patient_never_puts_one_patient_on_both_sides(site):
    train, held = split_by_patient(list_cases(site["site"]), 0.5)
    assert len(held) == 2 and not ({c.patient_key for c in train} & {c.patient_key for c in held})


def test_short_finetune_writes_a_version_whose_card_holds_counts_table_and_decision(site):
    config = load_config(site["config"])
    summary = finetune(site["site"], config, SHIPPED, iterations=4, batch_size=2, lr=3e-4, real_cases=[],
                       max_drop=0.02, holdout_fraction=0.5, promote=True, threads=1)
    gate = summary["gate"]
    assert summary["data"]["train_site_cases"] == 2 and summary["data"]["held_out_site_cases"] == 2
    assert [r["label"] for r in gate["rows"]] == [1, 2, 3, 4]  # partial labels: back muscles only
    rises = gate["mean"]["candidate"] > gate["mean"]["current"]
    no_fall = all(r["delta"] >= -0.02 for r in gate["rows"])
    assert gate["decision"] == ("promote" if rises and no_fall else "refuse")
    card = (Path(summary["path"]) / "docs" / "README.md").read_text()
    assert "Site fine-tune gate" in card and f"Decision: {gate['decision']}" in card
    registry = ModelRegistry(SHIPPED, config.learning.models_dir)
    assert (registry.active().version == summary["version"]) == summary["promoted"] == (gate["decision"] == "promote")
    assert registry.find(summary["version"]).path == Path(summary["path"])


def test_gate_refuses_a_deliberately_worse_candidate(site, tmp_path):
    current = load_bundle(SHIPPED, "cpu")
    network = build_network(current.metadata["network_def"])
    network.load_state_dict(current.network.state_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # heavy noise on every weight: a broken candidate
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std().clamp_min(1e-3) * 3)
    worse = write_bundle(network, current.metadata["network_def"], tmp_path / "worse", {"note": "perturbed"},
                         version="0.0.0-worse")
    cases = site_cases(site["site"])
    held = [cases[f"site:{c.case_id}"].load() for c in split_by_patient(list_cases(site["site"]), 0.5)[1]]
    result = compare(worse, current, held, max_drop=0.02)
    assert result.decision == "refuse"
    assert result.mean["candidate"] < result.mean["current"]
    assert any("mean Dice does not rise" in r for r in result.reasons), result.reasons


def test_promote_and_rollback_switch_the_pointer_and_are_audited(site, capsys):
    config = load_config(site["config"])
    registry = ModelRegistry(SHIPPED, config.learning.models_dir)
    current = load_bundle(SHIPPED, "cpu")
    network = build_network(current.metadata["network_def"])
    network.load_state_dict(current.network.state_dict())
    for name in ("0.3.0+site.90", "0.3.0+site.91"):
        write_bundle(network, current.metadata["network_def"], config.learning.models_dir / f"x-{name}",
                     {"note": "copy"}, version=name)
    before = registry.active().version

    def model(*args: str) -> tuple[int, str]:
        code = app_main(["--config", str(site["config"]), "model", "-m", str(SHIPPED), *args])
        return code, capsys.readouterr().out

    code, out = model("promote", "0.3.0+site.90")
    assert code == 2 and "did not pass the gate" in out
    for version in ("0.3.0+site.90", "0.3.0+site.91"):
        code, out = model("promote", version, "--force")
        assert code == 0, out
    assert "* 0.3.0+site.91" in model("list")[1] and "shipped" in model("list")[1]
    assert model("rollback")[0] == 0 and registry.active().version == "0.3.0+site.90"
    assert model("rollback")[0] == 0 and registry.active().version == before
    events = [e for e in read_audit(site["root"] / "audit.jsonl") if e["event"].startswith("model_")]
    assert [e["event"] for e in events][-4:] == ["model_promoted", "model_promoted", "model_rolled_back",
                                                 "model_rolled_back"]
    assert events[-1]["version"] == before and events[-3]["forced"] is True
    with pytest.raises(RegistryError):
        registry.promote("9.9.9")


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_node_finetune_starts_when_idle_at_low_priority_and_pauses_while_studies_wait(site, tmp_path):
    from app.node.audit import AuditLog
    from app.node.learning import FinetuneRunner

    config_path = tmp_path / "runner.yaml"
    raw = json.loads(site["config"].read_text())
    site_dir = tmp_path / "site"  # a copy without the earlier tests' fine-tune record: 4 new corrections
    shutil.copytree(site["site"], site_dir, ignore=shutil.ignore_patterns("finetune_state.json"))
    raw["learning"].update({"finetune_after": 2, "finetune_iterations": 2, "finetune_batch_size": 2,
                            "models_dir": str(tmp_path / "models"), "site_dir": str(site_dir)})
    config_path.write_text(json.dumps(raw))
    config = load_config(config_path)
    runner = FinetuneRunner(config, SHIPPED, AuditLog(tmp_path / "audit.jsonl"))
    runner.poll(studies_waiting=True)
    assert runner.process is None  # a study waits: no training
    runner.poll(studies_waiting=False)
    assert runner.process is not None
    pid = runner.process.pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19
    runner.poll(studies_waiting=True)
    time.sleep(0.5)
    assert runner.paused and _process_state(pid) == "T"  # stopped while studies wait
    runner.poll(studies_waiting=False)
    assert not runner.paused and _process_state(pid) != "T"
    deadline = time.monotonic() + 240
    while runner.process is not None and time.monotonic() < deadline:
        runner.poll(studies_waiting=False)
        time.sleep(0.5)
    assert runner.process is None
    events = [e["event"] for e in read_audit(tmp_path / "audit.jsonl")]
    assert events[:2] == ["finetune_started", "finetune_finished"]
    finished = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "finetune_finished"][0]
    assert finished["exit_code"] == 0, (tmp_path / "models" / ".work" / "finetune.log").read_text()[-3000:]
    state = json.loads((site_dir / "finetune_state.json").read_text())
    assert state["cases_at_last_finetune"] == 4 and state["decision"] in ("promote", "refuse")
    runner.poll(studies_waiting=False)  # no new corrections since: nothing starts
    assert runner.process is None


def test_site_dataset_refuses_a_case_beyond_its_quota(site, tmp_path, capsys):
    args = ["add", str(site["root"] / "seg41.dcm"), str(site["root"] / "study41"), "--site", str(tmp_path / "small"),
            "--model", str(SHIPPED)]
    assert site_main([*args, "--quota-mb", "0.01"]) == 2
    assert "quota" in capsys.readouterr().err and list_cases(tmp_path / "small") == []
    assert site_main(args) == 0 and len(list_cases(tmp_path / "small")) == 1


def test_running_node_fine_tunes_by_itself_when_enough_corrections_wait_and_audits_it(site, tmp_path):
    """The node's scheduler drives the runner: with ``finetune_after`` corrections in its site
    dataset and no study waiting, ``python -m app serve`` starts a fine-tune, reaps it and audits both."""
    from tests.peers import start_node

    site_dir = tmp_path / "site"  # the four cases, without the earlier tests' fine-tune record
    shutil.copytree(site["site"], site_dir, ignore=shutil.ignore_patterns("finetune_state.json"))
    learning = {"site_dir": str(site_dir), "models_dir": str(tmp_path / "models"), "refused_dir": str(tmp_path / "refused"),
                "finetune_after": 2, "finetune_iterations": 2, "finetune_batch_size": 2}
    audit = tmp_path / "audit.jsonl"
    node = start_node(tmp_path / "node", SHIPPED, workers=1, audit_log=str(audit), sections={"learning": learning})
    try:
        deadline = time.monotonic() + 300
        finished: list[dict] = []
        while not finished and time.monotonic() < deadline:
            assert node.alive(), node.log_text()[-3000:]
            finished = [e for e in read_audit(audit) if e["event"] == "finetune_finished"] if audit.is_file() else []
            time.sleep(1.0)
        assert finished, node.log_text()[-3000:]
        assert finished[0]["exit_code"] == 0, (tmp_path / "models" / ".work" / "finetune.log").read_text()[-3000:]
        started = [e for e in read_audit(audit) if e["event"] == "finetune_started"]
        assert started and started[0]["site_cases"] == 4 and started[0]["new_cases"] == 4
        state = json.loads((site_dir / "finetune_state.json").read_text())
        assert state["cases_at_last_finetune"] == 4 and state["decision"] in ("promote", "refuse")
    finally:
        node.stop()
