"""The results document as a markdown table set (``latest.md``), with the targets beside the figures."""

from __future__ import annotations

from benchmarks.nodebench import STAGES

NOT_MEASURED_GPU = "not measured (no GPU lent)"

#: (target key, text, limit, unit, lower is better)
TARGETS = (
    ("gpu_inference_50", "GPU inference, 50-slice series", 0.5, "s", True),
    ("gpu_e2e", "end to end with a GPU (excl. quiet period)", 5.0, "s", True),
    ("cpu_e2e", "end to end, CPU only, 512x512x50 (excl. quiet period)", 20.0, "s", True),
    ("ingest_ratio", "ingest, node / DCMTK storescp (MB/s)", 0.7, "x", False),
    ("peak_rss", "peak RSS of the node + workers, one study", 3072.0, "MiB", True),
)


def _find_inference(results: dict, device: str, series: str = "syn512") -> dict | None:
    for entry in results.get("inference", []):
        if entry.get("device", "").startswith(device) and entry.get("series") == series and entry.get("stacks"):
            return entry["stacks"][0]
    return None


def _find_e2e(results: dict, device: str) -> dict | None:
    for entry in results.get("e2e", []):
        if entry.get("device", "").startswith(device) and entry.get("median"):
            return entry
    return None


def target_rows(results: dict) -> list[dict]:
    """One row per target: the measured figure (or why there is none) and whether it is met."""
    gpu = results.get("machine", {}).get("gpu", {}).get("available", False)
    rows = []
    for key, text, limit, unit, lower in TARGETS:
        value, note = None, ""
        if key == "gpu_inference_50":
            row = _find_inference(results, "cuda")
            if row:
                value = row["segment_stack_median_s"]
                note = f"whole segmentation step; network alone {row['network_median_s']} s"
        elif key == "gpu_e2e":
            row = _find_e2e(results, "cuda")
            value = row["median"]["e2e_excl_quiet_s"] if row else None
        elif key == "cpu_e2e":
            row = _find_e2e(results, "cpu")
            if row:
                value = row["median"]["e2e_excl_quiet_s"]
                note = f"{row['study']}, median of {row['repeats']}"
        elif key == "ingest_ratio":
            ingest = results.get("ingest") or {}
            value = ingest.get("median_ratio")
            if value is not None:
                note = (f"node {ingest['median_node_mb_per_s']} MB/s vs storescp with Nagle off "
                        f"{ingest['median_storescp_nodelay_mb_per_s']} MB/s (as shipped: "
                        f"{ingest['median_storescp_mb_per_s']} MB/s, ratio {ingest['median_ratio_over_storescp']}"
                        + (f"; with a sync per instance: {ingest['median_storescp_nodelay_sync_mb_per_s']} MB/s, "
                           f"ratio {ingest['median_ratio_over_storescp_nodelay_sync']}"
                           if "median_ratio_over_storescp_nodelay_sync" in ingest else "")
                        + f"); {ingest['instances_per_round']} instances x {len(ingest['rounds'])} rounds")
        elif key == "peak_rss":
            values = [e["median"].get("peak_rss_mib") for e in results.get("e2e", []) if e.get("median")]
            values = [v for v in values if v is not None]
            if values:
                value = max(values)
                note = "largest median over the e2e runs"
        if key == "cpu_e2e" and value is not None and _find_e2e(results, "cpu")["study"] != "syn512":
            rows.append({"target": text, "limit": f"<= {limit:g} {unit}", "measured": f"{value} {unit}",
                         "met": "n/a (not the 512x512x50 study)", "note": note})
            continue
        if value is None:
            shown = NOT_MEASURED_GPU if key.startswith("gpu") and not gpu else "not measured (suite not run)"
            met = "-"
        else:
            shown = f"{value} {unit}"
            met = "yes" if (value <= limit if lower else value >= limit) else "NO"
        rows.append({"target": text, "limit": f"{'<=' if lower else '>='} {limit:g} {unit}", "measured": shown,
                     "met": met, "note": note})
    return rows


def _model_text(model) -> str:
    if isinstance(model, dict):
        return f"{model.get('name')} {model.get('version')} (weights {str(model.get('weights_sha256'))[:12]})"
    return str(model)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out


def to_markdown(results: dict) -> str:
    m = results.get("machine", {})
    gpu = m.get("gpu", {})
    lines = [f"# Benchmark results ({results.get('label') or 'unlabelled run'})", "",
             f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable CPU cores, {m.get('memory_gib')} GiB; "
             f"load average (1/5/15 min) at start {m.get('load_average_at_start')}, at end "
             f"{results.get('load_average_at_end')}; torch {m.get('torch')} ({m.get('torch_threads')} threads); GPU: "
             f"{gpu.get('name') if gpu.get('available') else NOT_MEASURED_GPU}; source {m.get('source_revision')}; "
             f"{m.get('started_at')}; command `{results.get('command')}`; model "
             f"{_model_text(results.get('model'))}.", ""]
    lines += ["## Targets", ""]
    lines += _table(["target", "limit", "measured", "met", "note"],
                    [[r["target"], r["limit"], r["measured"], r["met"], r["note"]] for r in target_rows(results)])
    for entry in results.get("e2e", []):
        med = entry.get("median", {})
        lines += ["", f"## End to end: {entry['study']} ({entry['description']}), device {entry['device']}, "
                      f"worker threads {entry.get('node_threads', 'default')}", "",
                  f"Last instance acknowledged -> SEG, SR and PDF acknowledged by the archive, minus the quiet period "
                  f"({entry['quiet_period_s']} s); median of {entry['repeats']} studies after a warm-up study; "
                  f"{entry['instances']} instances, {entry['bytes'] / 1e6:.1f} MB.", ""]
        parts = [("completion detected after the quiet period", "completion_detect_s"),
                 ("dispatch to a worker", "dispatch_s")]
        parts += [(f"stage {s}", f"stage_{s}_s") for s in STAGES]
        parts += [("other analysis time (graph set-up, indexing, writing results)", "analysis_other_s"),
                  ("send (C-STORE of SEG, SR, PDF to the archive)", "send_s"),
                  ("**total, excl. quiet period**", "e2e_excl_quiet_s"),
                  ("(analysis as the worker timed it)", "worker_elapsed_s"),
                  ("(ingest of the study, first request -> last response)", "ingest_s"),
                  ("(CPU seconds used by node + workers for the study: independent of the load, unlike the wall times)",
                   "cpu_s"),
                  ("(peak RSS, node + workers, MiB)", "peak_rss_mib")]
        runs = entry.get("runs", [])
        lines += _table(["part", "median s", "runs s"],
                        [[name, med.get(key), ", ".join(str(r.get(key)) for r in runs)] for name, key in parts])
        loads = [r.get("load_average_before", [None])[0] for r in runs]
        lines.append(f"\nLoad average (1 min) before each study: {loads}.")
        mem = entry.get("memory", {})
        if mem.get("processes"):
            lines += ["", "Processes of the node during the study with the highest peak (VmHWM = each one's own peak):",
                      ""]
            lines += _table(["pid", "VmHWM MiB", "command"],
                            [[p["pid"], p["vm_hwm_mib"], p["cmd"][:90]] for p in mem["processes"]])
    if results.get("inference"):
        lines += ["", "## Inference per series (in-process)", ""]
        rows = []
        for entry in results["inference"]:
            for s in entry.get("stacks", []):
                rows.append([s["series"], s["stack"], "x".join(map(str, s["source_shape"])),
                             "x".join(map(str, s["model_space_shape"])), s["windows_per_slice"], s["device"],
                             s["torch_threads"], s["preprocess_median_s"], s["network_median_s"],
                             s["network_per_slice_ms"], s["segment_stack_median_s"], s["load_average_before"][0]])
        if not any(e.get("device", "").startswith("cuda") for e in results["inference"]):
            rows.append(["(all)", "", "", "", "", "cuda", "", NOT_MEASURED_GPU, "", "", "", ""])
        lines += _table(["series", "stack", "source (slices x rows x cols)", "model space", "windows/slice", "device",
                         "threads", "preprocess s", "network s", "network ms/slice",
                         "segmentation step s (network + inverse + post-processing)", "load 1 min"], rows)
    if results.get("stages"):
        st = results["stages"]
        lines += ["", f"## Stages in-process ({st['study']}, median of {st['repeats']} after a warm-up)", ""]
        lines += _table(["stage", "median s"], [[k, v] for k, v in st["median_s"].items()]
                        + [["**total**", st["total_median_s"]]])
    parts = results.get("parts")
    if parts:
        lines += ["", f"## Optimisations against the code they replaced ({parts['study']}, {parts['rounds']} "
                      f"alternating rounds, in-process, CPU)", ""]
        lines += _table(["optimisation", "reference median s", "optimised median s", "median ratio", "same output"],
                        [[name, row["reference_median_s"], row["optimised_median_s"], row["median_ratio"],
                          row["identical"]] for name, row in parts.items() if isinstance(row, dict)])
    ingest = results.get("ingest")
    if ingest and not ingest.get("skipped"):
        lines += ["", f"## Ingest: node vs DCMTK storescp ({ingest['study']}, {ingest['instances_per_round']} "
                      f"instances, "
                      f"{ingest['bytes_per_round'] / 1e6:.1f} MB per round, same storescu, receivers in turn)", ""]
        # Older result files have no "receivers" (node, storescp, storescp_nodelay only).
        names = ingest.get("receivers") or ["node", "storescp", "storescp_nodelay"]
        scps = [n for n in names if n.startswith("storescp")]
        nodes = [n for n in names if not n.startswith("storescp")]
        ratio_cols = [(f"node / {scp}", f"ratio_node_over_{scp}") for scp in scps]
        ratio_cols += [(f"{node} / storescp_nodelay", f"ratio_{node}_over_storescp_nodelay")
                       for node in nodes if node != "node"]
        if "node_baseline" in nodes:
            ratio_cols.append(("node / node_baseline", "ratio_node_over_node_baseline"))

        def median_ratio(key: str) -> object:
            if key == "ratio_node_over_node_baseline":
                return ingest.get("median_ratio_node_over_node_baseline", "")
            node, scp = key[len("ratio_"):].split("_over_")
            return ingest.get(f"median_ratio_over_{scp}" if node == "node" else f"median_ratio_{node}_over_{scp}", "")

        lines += _table(["round", "order"] + [f"{n} MB/s (inst/s)" for n in names]
                        + [label for label, _ in ratio_cols] + ["load 1 min"],
                        [[r["round"], " > ".join(r["order"])]
                         + [f"{r[f'{n}_mb_per_s']} ({r[f'{n}_instances_per_s']})" for n in names]
                         + [r.get(key, "") for _, key in ratio_cols]
                         + [r["load_average_before"][0]] for r in ingest["rounds"]]
                        + [["**median**", ""]
                           + [f"{ingest[f'median_{n}_mb_per_s']} ({ingest[f'median_{n}_instances_per_s']})"
                              for n in names]
                           + [median_ratio(key) for _, key in ratio_cols] + [""]])
        if all(f"median_{n}_cpu_ms_per_instance" in ingest for n in names):
            lines.append("\nCPU ms per instance (median): " + ", ".join(
                f"{n} {ingest[f'median_{n}_cpu_ms_per_instance']}" for n in names) + ".")
        lines.append(f"\n{ingest['note']}. The target is judged against storescp with Nagle off.")
    elif ingest:
        lines += ["", f"## Ingest: {ingest['skipped']}"]
    conc = results.get("concurrency")
    if conc:
        lines += ["", f"## {conc['senders']} concurrent senders ({conc['study']}, node with {conc['workers']} "
                      f"worker(s), "
                      f"device {conc['device']}, quiet period {conc['quiet_period_s']} s)", ""]
        lines += _table(["round", "wall s (first request -> last result acknowledged)", "studies/min",
                         "per-study latency excl. quiet s", "CPU s (node + workers)", "peak RSS MiB", "load 1 min"],
                        [[i + 1, r["wall_s"], r["studies_per_min"], r["latency_excl_quiet_s"], r.get("cpu_s"),
                          r["peak_rss_mib"], r["load_average_before"][0]] for i, r in enumerate(conc["rounds"])])
        lines.append(f"\nMedian {conc['median_studies_per_min']} studies/min; peak RSS {conc['max_peak_rss_mib']} MiB.")
    return "\n".join(lines) + "\n"
