"""The run report (REPORT.md, report.json, plot) and Hub publishing (model card, upload folder, push)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_distill.pipeline import Pipeline


def collect(p: Pipeline) -> dict[str, Any]:
    """Everything the report and the model card say, from the stages' folders."""
    teacher, student, distill = p.info("teacher"), p.info("student"), p.info("distill")
    export, bench = p.info("export"), p.info("bench")
    result: dict[str, Any] = {
        "command": p.command,
        "teacher": {
            "source": p.config.teacher.model,
            "path": teacher.get("path"),
            "accuracy": teacher.get("accuracy"),
            "parameters": teacher.get("parameters"),
            "layers": teacher.get("layers"),
        },
        "student": {
            "parameters": student.get("parameters"),
            "teacher_layers_copied": student.get("layers"),
            "accuracy": distill.get("student", {}).get("accuracy"),
        },
        "kd_settings": distill.get("settings"),
        "baseline_accuracy": distill.get("baseline", {}).get("accuracy"),
        "refine": p.info("refine") or None,
        "export": [
            {k: r[k] for k in ("variant", "file", "size_bytes", "metric_value", "metric_drop", "passed")}
            for r in export.get("variants", [])
        ],
        "latency": [
            {
                k: r[k]
                for k in ("engine", "variant", "batch", "seq_len", "p50_ms", "p90_ms", "throughput_per_s", "size_mb")
            }
            for r in bench.get("rows", [])
        ],
        "machine": bench.get("machine"),
        "stage_seconds": {
            s: p.info(s).get("seconds")
            for s in ("teacher", "student", "distill", "refine", "export", "bench")
            if p.info(s)
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
        f"{len(s['teacher_layers_copied'] or [])} (teacher layers {s['teacher_layers_copied']}) |",
    ]
    if r["baseline_accuracy"] is not None:
        lines.append(f"| student, labels only (no KD) | {_num(r['baseline_accuracy'])} | same | same |")
    if r.get("kd_gain_points") is not None:
        lines += ["", f"KD gain over the no-KD baseline: {r['kd_gain_points']:+.2f} points."]
    if r["refine"]:
        lines += ["", f"Refined ({r['refine'].get('method')}): dev accuracy {_num(r['refine'].get('accuracy'))}."]
    lines += ["", f"KD settings: `{json.dumps(r['kd_settings'])}`", ""]
    if r["export"]:
        lines += ["## ONNX variants", "", "| variant | dev accuracy | drop | size MB | gate |", "|---|---|---|---|---|"]
        lines += [
            f"| {e['variant']} | {e['metric_value']:.2f} | {e['metric_drop']:.2f} | {e['size_bytes'] / 1e6:.1f} "
            f"| {'pass' if e['passed'] else 'FAIL'} |"
            for e in r["export"]
        ]
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


def write_report(p: Pipeline) -> dict[str, Any]:
    result = collect(p)
    (p.root / "report.json").write_text(json.dumps(result, indent=2))
    (p.root / "REPORT.md").write_text(markdown(result))
    if (p.root / "bench" / "bench.png").is_file():
        shutil.copy(p.root / "bench" / "bench.png", p.root / "bench.png")
    summary = [line for line in markdown(result).splitlines()[2:] if not line.startswith("![")]
    print("\n" + "\n".join(summary) + f"\nreport: {p.root / 'REPORT.md'}")
    return result


def model_card(r: dict[str, Any], repo_id: str | None) -> str:
    """A Hub model card: what it is, how well it does, how fast, how to run it on a device, how to reproduce it."""
    t, s = r["teacher"], r["student"]
    best = next((e for e in r["export"] if e["variant"].startswith("int8") and e["passed"]), None)
    body = markdown(r).split("\n", 2)[2]  # the report without its title
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-classification",
            "tags:",
            "- distillation",
            "- hf_distill",
            "- onnx",
            "---",
            "",
            f"# {repo_id or 'Distilled student'}",
            "",
            f"A {len(s['teacher_layers_copied'] or [])}-layer student distilled with "
            f"hf_distill from `{t['source']}` ({t['layers']} layers), which was fine-tuned on the "
            "task first. It keeps the teacher's tokenizer and labels.",
            "",
            body,
            "",
            "## Run the ONNX model on a device",
            "",
            "The `onnx/` folder runs with onnxruntime, tokenizers and numpy only (no torch):",
            "",
            "```bash",
            "pip install onnxruntime tokenizers numpy",
            'python edge_runner.py onnx "a gripping , funny film"',
            "```",
            "",
            f"Default variant: `{best['variant'] if best else 'fp32'}`.",
            "",
            "## Use with transformers",
            "",
            "```python",
            "from transformers import pipeline",
            f"pipe = pipeline('text-classification', model='{repo_id or '.'}')",
            "```",
            "",
        ]
    )


def build_upload_folder(p: Pipeline, dest: Path) -> Path:
    """The folder pushed to the Hub: the student, `onnx/` (passing variants), `edge_runner.py`, README.md card."""
    from hf_distill.stages import student_model_dir

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(student_model_dir(p), dest, ignore=shutil.ignore_patterns("training_args.bin", "checkpoint*"))
    onnx_dir = p.root / "export" / "onnx"
    if onnx_dir.is_dir():
        manifest = json.loads((onnx_dir / "hf_distill_manifest.json").read_text())
        keep = set(manifest["variants"].values())
        shutil.copytree(
            onnx_dir,
            dest / "onnx",
            ignore=lambda _d, names: [n for n in names if n.endswith(".onnx") and n not in keep],
        )
        runner = Path(__file__).resolve().parent.parent / "export" / "edge_runner.py"
        if runner.is_file():
            shutil.copy(runner, dest / "edge_runner.py")
    (dest / "README.md").write_text(model_card(collect(p), p.config.push.repo_id))
    return dest


def push_folder(folder: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create the repo (if needed) and upload ``folder``. The token comes from the argument, HF_TOKEN or the cached
    login, and is never printed or logged."""
    from huggingface_hub import HfApi

    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload hf_distill student")
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
