"""The run report: REPORT.md, report.json and the plot, from the stages' ``.done`` records."""

from __future__ import annotations

import json
import shutil
from typing import Any

from hf_distill.pipeline.config import PipelineConfig
from hf_distill.pipeline.workspace import Workspace


def collect(config: PipelineConfig, command: str, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the report and the model card say, from the stages' records ``infos`` (stage name -> its ``.done``
    content; :func:`hf_distill.pipeline.stage_keys.stage_infos` leaves out stages finished under another config)."""
    teacher, student, distill = infos["teacher"], infos["student"], infos["distill"]
    export, bench, refine = infos["export"], infos["bench"], infos["refine"]
    result: dict[str, Any] = {
        "command": command,
        "labels": teacher.get("labels"),
        "teacher": {
            "source": config.teacher.model,
            "path": teacher.get("path"),
            "accuracy": teacher.get("accuracy"),
            "parameters": teacher.get("parameters"),
            "layers": teacher.get("layers"),
        },
        "student": {
            "parameters": student.get("parameters"),
            "teacher_layers_copied": student.get("layers"),
            "hidden_size": student.get("hidden_size"),
            "accuracy": distill.get("student", {}).get("accuracy"),
            "train_rows": distill.get("student", {}).get("train_rows"),
            "unlabelled_rows": distill.get("student", {}).get("unlabelled_rows"),
        },
        "kd_settings": distill.get("settings"),
        "baseline_accuracy": distill.get("baseline", {}).get("accuracy"),
        "refine": {k: refine.get(k) for k in ("method", "accuracy")} if refine else None,
        "export": [
            {k: r[k] for k in ("variant", "file", "size_bytes", "metric_value", "metric_drop", "passed")}
            for r in export.get("variants", [])
        ],
        "export_engine": {k: export.get(k) for k in ("engine", "engine_reason", "kv_cache")} if export else None,
        "latency": [
            {
                k: r[k]
                for k in ("engine", "variant", "batch", "seq_len", "p50_ms", "p90_ms", "throughput_per_s", "size_mb")
            }
            for r in bench.get("rows", [])
        ],
        "machine": bench.get("machine"),
        "stage_seconds": {
            s: infos[s].get("seconds")
            for s in ("teacher", "student", "distill", "refine", "export", "bench")
            if infos[s]
        },
    }
    if result["baseline_accuracy"] is not None and result["student"]["accuracy"] is not None:
        result["kd_gain_points"] = result["student"]["accuracy"] - result["baseline_accuracy"]
    return result


def _num(value: Any, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(r: dict[str, Any]) -> str:
    t, s = r["teacher"], r["student"]
    lines = [
        "# hf_distill run report",
        "",
        "| model | dev accuracy | parameters | layers |",
        "|---|---|---|---|",
        f"| teacher ({t['source']}) | {_num(t['accuracy'])} | {_num((t['parameters'] or 0) / 1e6, '.1f')}M | "
        f"{t['layers']} |",
        f"| student (KD) | {_num(s['accuracy'])} | {_num((s['parameters'] or 0) / 1e6, '.1f')}M | "
        f"{len(s['teacher_layers_copied'] or [])} (teacher layers {s['teacher_layers_copied']}"
        + (f", width {s['hidden_size']}" if s.get("hidden_size") else "")
        + ") |",
    ]
    if r["baseline_accuracy"] is not None:
        lines.append(f"| student, labels only (no KD) | {_num(r['baseline_accuracy'])} | same | same |")
    if r.get("labels"):
        lines += ["", "Classes (id: name): " + ", ".join(f"{i}: {name}" for i, name in enumerate(r["labels"])) + "."]
    if s.get("unlabelled_rows"):
        lines += ["", f"The student learnt from {s['train_rows']} rows, {s['unlabelled_rows']} of them unlabelled."]
    if r.get("kd_gain_points") is not None:
        lines += ["", f"KD gain over the no-KD baseline: {r['kd_gain_points']:+.2f} points."]
    if r["refine"]:
        lines += ["", f"Refined ({r['refine'].get('method')}): dev accuracy {_num(r['refine'].get('accuracy'))}."]
    lines += ["", f"KD settings: `{json.dumps(r['kd_settings'])}`", ""]
    if r["export"]:
        lines += ["## ONNX variants", "", "| variant | dev accuracy | drop | size MB | gate |", "|---|---|---|---|---|"]
        lines += [
            f"| {e['variant']} | {_num(e['metric_value'])} | {_num(e['metric_drop'])} | {e['size_bytes'] / 1e6:.1f} "
            f"| {'pass' if e['passed'] else 'FAIL'} |"
            for e in r["export"]
        ]
        engine = r.get("export_engine") or {}
        if engine.get("engine"):
            cache = "with a KV cache" if engine.get("kv_cache") else "no KV cache"
            lines += ["", f"Exporter: {engine['engine']}, {cache} ({engine.get('engine_reason')})."]
    if r["latency"]:
        m = r["machine"] or {}
        lines += [
            "",
            f"## Latency ({m.get('cpu')}, {m.get('logical_cpus')} CPUs, flags {m.get('cpu_flags')})",
            "",
            "| engine | variant | batch | seq | p50 ms | p90 ms | per s | MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['engine']} | {x['variant']} | {x['batch']} | {x['seq_len']} | {x['p50_ms']:.2f} | "
            f"{x['p90_ms']:.2f} | {x['throughput_per_s']:.1f} | {x['size_mb']:.1f} |"
            for x in r["latency"]
        ]
        lines += ["", "![latency against size](bench.png)"]
    lines += [
        "",
        "Stage times (s): " + json.dumps(r["stage_seconds"]),
        "",
        "Reproduce:",
        "",
        "```bash",
        r["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def write_report(
    ws: Workspace, config: PipelineConfig, command: str, infos: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Write report.json, REPORT.md and the plot into the run folder; print the summary; return the report."""
    result = collect(config, command, infos)
    ws.report_json.write_text(json.dumps(result, indent=2))
    ws.report_md.write_text(markdown(result))
    if (ws.bench_dir / "bench.png").is_file():
        shutil.copy(ws.bench_dir / "bench.png", ws.report_plot)
    summary = [line for line in markdown(result).splitlines()[2:] if not line.startswith("![")]
    print("\n" + "\n".join(summary) + f"\nreport: {ws.report_md}")
    return result
