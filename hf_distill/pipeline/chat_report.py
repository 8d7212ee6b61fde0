"""The report of a chat-LM run (``task: causal-lm``): REPORT.md, report.json and the speed plot, from the stages'
``.done`` records."""

from __future__ import annotations

import json
import shutil
from typing import Any

from hf_distill.pipeline.config import PipelineConfig
from hf_distill.pipeline.workspace import Workspace

_STAGES = ("teacher", "student", "distill", "export", "bench")


def collect(config: PipelineConfig, command: str, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything REPORT.md says, from ``infos`` (stage name -> its ``.done`` record, empty when not finished under
    this config)."""
    teacher, student, distill = infos["teacher"], infos["student"], infos["distill"]
    models = [
        _model("teacher", teacher.get("layers"), teacher.get("parameters"), teacher.get("evaluation")),
        _model(
            "cut student, untrained",
            len(student.get("layers") or []),
            student.get("parameters"),
            student.get("evaluation"),
        ),
    ]
    for name, label in (("student", "distilled student"), ("baseline", "labels only (SFT on references)")):
        if name in distill:
            run = distill[name]
            models.append(_model(label, models[1]["layers"], student.get("parameters"), run.get("evaluation")))
            models[-1].update(tokens_per_s=run.get("tokens_per_s"), train_seconds=run.get("train_seconds"))
    return {
        "task": "causal-lm",
        "command": command,
        "teacher_source": config.teacher.model,
        "kept_teacher_layers": student.get("layers"),
        "layer_selection": student.get("layer_selection"),
        "models": models,
        "kd_settings": distill.get("settings"),
        "train_rows": (distill.get("student") or {}).get("train"),
        "export": infos["export"].get("variants", []),
        "export_reference": infos["export"].get("reference"),
        "speed": infos["bench"].get("rows", []),
        "machine": infos["bench"].get("machine"),
        "stage_seconds": {s: infos[s].get("seconds") for s in _STAGES if infos[s]},
    }


def _model(name: str, layers: Any, parameters: Any, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    evaluation = evaluation or {}
    return {
        "model": name,
        "layers": layers,
        "parameters": parameters,
        "rouge_l": evaluation.get("rouge_l"),
        "teacher_perplexity": evaluation.get("teacher_perplexity"),
        "num_rows": evaluation.get("num_rows"),
        "samples": evaluation.get("samples", []),
    }


def _num(value: Any, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(r: dict[str, Any]) -> str:
    rows = r["models"]
    evaluated = next((m["num_rows"] for m in rows if m["num_rows"]), None)
    lines = [
        "# hf_distill run report (chat LM)",
        "",
        f"ROUGE-L of greedy answers to {evaluated} held-out rows (rouge-score, ×100) and the teacher's perplexity "
        "of each model's answers.",
        "",
        "| model | layers | parameters | ROUGE-L | teacher ppl of its answers | training tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m['model']} | {_num(m['layers'], 'd')} | {_num((m['parameters'] or 0) / 1e6, '.1f')}M | "
        f"{_num(m['rouge_l'])} | {_num(m['teacher_perplexity'])} | {_num(m.get('tokens_per_s'), '.0f')} |"
        for m in rows
    ]
    lines += ["", f"Teacher layers kept: {r['kept_teacher_layers']} ({_selection(r['layer_selection'])})."]
    lines += ["", f"KD settings: `{json.dumps(r['kd_settings'])}`; training rows: `{json.dumps(r['train_rows'])}`"]
    if r["export"]:
        ref = r["export_reference"] or {}
        lines += [
            "",
            f"## ONNX variants (onnxruntime-genai, KV cache; PyTorch perplexity {_num(ref.get('value'), '.3f')})",
            "",
            "| variant | perplexity | increase % | greedy agreement | MB | gate |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {e['variant']} | {_num(e.get('perplexity'), '.3f')} | {_num(e.get('ppl_increase_pct'), '+.2f')} | "
            f"{_num(e.get('greedy_agreement'), '.3f')} | {_num((e.get('size_bytes') or 0) / 1e6, '.1f')} | "
            f"{'pass' if e.get('passed') else 'FAIL: ' + _quote(str(e.get('reason')), 160)} |"
            for e in r["export"]
        ]
    lines += _speed(r)
    lines += _samples(rows)
    lines += ["", "Stage times (s): " + json.dumps(r["stage_seconds"]), "", "Reproduce:", "", "```bash"]
    return "\n".join([*lines, r["command"], "```", ""])


def _selection(record: Any) -> str:
    if isinstance(record, dict):
        return f"selection: {record.get('method')}"
    return "given by the config" if record is None else f"selection: {record}"


def _speed(r: dict[str, Any]) -> list[str]:
    if not r["speed"]:
        return []
    m = r["machine"] or {}
    lens = list(r["speed"][0]["ttft_ms"])
    batches = list(r["speed"][0]["decode_tokens_per_s"])
    header = ["engine", "variant", *[f"TTFT ms @{n}" for n in lens], *[f"decode tok/s b{b}" for b in batches]]
    lines = [
        "",
        f"## Speed ({m.get('cpu')}, {m.get('logical_cpus')} CPUs, flags {m.get('cpu_flags')})",
        "",
        "| " + " | ".join([*header, "peak RSS MB", "MB"]) + " |",
        "|" + "---|" * (len(header) + 2),
    ]
    for x in r["speed"]:
        cells = [x["engine"], x["variant"], *[_num(x["ttft_ms"][n], ".1f") for n in lens]]
        cells += [_num(x["decode_tokens_per_s"][b], ".1f") for b in batches]
        cells += [_num(x.get("peak_rss_mb"), ".0f"), _num(x.get("size_mb"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", "![decode speed against size](bench.png)"]


def _samples(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Sample answers"]
    for m in rows:
        for sample in m["samples"][:2]:
            lines += ["", f"**{m['model']}** — {_quote(sample['prompt'])}", "", f"> {_quote(sample['response'])}"]
    return lines


def _quote(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit] + " …"


def write_report(
    ws: Workspace, config: PipelineConfig, command: str, infos: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Write report.json, REPORT.md and the plot into the run folder; print the summary; return the report."""
    result = collect(config, command, infos)
    ws.report_json.write_text(json.dumps(result, indent=2))
    text = markdown(result)
    ws.report_md.write_text(text)
    if (ws.bench_dir / "bench.png").is_file():
        shutil.copy(ws.bench_dir / "bench.png", ws.report_plot)
    print("\n" + "\n".join(line for line in text.splitlines()[2:12]) + f"\nreport: {ws.report_md}")
    return result
