"""`benchmark`: latency, throughput, memory and size of PyTorch eager (teacher, student) against every ONNX variant.

Each engine runs in its own spawned process so that its peak RSS is its own, not the sum of everything loaded before.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hf_distill.engine_timing import measure_classifier_engine
from hf_distill.export.inputs import usable_positions

logger = logging.getLogger(__name__)
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "neon", "asimd")


def machine_info(threads: int | None) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": sorted(f for f in _FLAGS if f in flags),
        "logical_cpus": os.cpu_count(),
        "threads": threads or "default (all cores)",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "platform": platform.platform(),
    }


def measure_in_fresh_process(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run :func:`_measure` in a newly spawned interpreter (clean peak RSS, no shared thread pools)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_classifier_engine, spec).result()


def _size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [p for p in path.iterdir() if p.suffix == ".safetensors"] if path.is_dir() else [path]
    files += list(path.parent.glob(path.name + ".data")) if not path.is_dir() else []
    return sum(os.path.getsize(p) for p in files) / 1e6


def benchmark(
    export_dir: str | os.PathLike,
    *,
    student: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    teacher_metric: float | None = None,
    variants: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    seq_lens: Sequence[int] = (64, 128),
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Benchmark an export folder's variants (and the PyTorch student/teacher folders) over a batch × sequence grid.

    Writes ``bench.json``, ``bench.md`` and ``bench.png`` into ``output_dir`` (default: the export folder) and
    returns the same data. Metrics come from the export report (ONNX variants, PyTorch student) and
    ``teacher_metric`` (the teacher).

    Raises:
        ValueError: before anything runs — no export report, unknown or failed variants, an unreadable ``.onnx``
            file, a student/teacher folder without a model, or a grid longer than the graph's usable positions.
    """
    export_dir = Path(export_dir)
    report, chosen = _read_export(export_dir, variants)
    for name, folder in (("student", student), ("teacher", teacher)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            raise ValueError(f"The {name} folder {str(folder)!r} holds no saved model (config.json missing).")
    if min(batch_sizes) < 1 or min(seq_lens) < 1 or runs < 1:
        raise ValueError("batch sizes, sequence lengths and runs must be >= 1.")
    max_positions = export_positions(export_dir)
    if max(seq_lens) > max_positions:
        raise ValueError(
            f"Sequence length {max(seq_lens)} exceeds this export's {max_positions} usable positions "
            "(position table less any offset and soft prompt); pass shorter --seq-lens."
        )
    common = {
        "batch_sizes": list(batch_sizes),
        "seq_lens": list(seq_lens),
        "warmup": warmup,
        "runs": runs,
        "threads": threads,
        "vocab": json.loads((export_dir / "config.json").read_text()).get("vocab_size", 1000),
    }
    specs = _pytorch_specs(report["reference"], student, teacher, teacher_metric, common)
    specs += _onnx_specs(export_dir, {r["variant"]: r for r in report["variants"]}, chosen, common)
    rows: list[dict[str, Any]] = []
    for spec, meta in specs:
        logger.info("benchmarking %s %s", meta["engine"], meta["variant"])
        print(f"[bench] {meta['engine']} {meta['variant']} ...", flush=True)
        rows += [{**meta, **m} for m in measure_in_fresh_process(spec)]
    result = {"machine": machine_info(threads), "rows": rows, "warmup": warmup, "runs": runs}
    result["warnings"] = _int8_warnings(rows)
    _write_results(result, Path(output_dir) if output_dir is not None else export_dir)
    return result


def _read_export(export_dir: Path, variants: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
    """The export report and the variants to run (default: all that passed), each file checked to be readable."""
    report_path = export_dir / "export_report.json"
    if not export_dir.is_dir():
        raise ValueError(f"{str(export_dir)!r} does not exist: pass a folder written by `hf-distill export`.")
    if not report_path.is_file():
        raise ValueError(
            f"{str(export_dir)!r} holds no export_report.json: pass a folder written by export_onnx / "
            "`hf-distill export`."
        )
    try:
        report = json.loads(report_path.read_text())
        available = {r["variant"]: r for r in report["variants"] if r["passed"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{report_path} is not a valid export report ({type(err).__name__}: {err}).") from err
    if report.get("format") == "hf_distill-genai/1":
        raise ValueError(
            f"{str(export_dir)!r} is a decoder-LM export with a KV cache (onnxruntime-genai): time it with "
            "benchmark_llm (hf_distill.export.bench_llm), which `hf-distill bench` uses for such folders."
        )
    chosen = list(variants or available)
    missing = [v for v in chosen if v not in available]
    if missing:
        raise ValueError(
            f"Variants {missing} are not in {export_dir} (or failed their gate); available: {sorted(available)}."
        )
    for variant in chosen:
        check_onnx_file(export_dir / available[variant]["file"])
    return report, chosen


def check_onnx_file(path: Path) -> None:
    """Parse an ONNX file's graph (not its external weights) so that a corrupt file is an error before any run.

    Raises:
        ValueError: the file is missing, truncated or not ONNX.
    """
    import onnx

    try:
        if not onnx.load(str(path), load_external_data=False).graph.node:
            raise ValueError("the graph has no nodes")
    except Exception as err:  # protobuf's DecodeError, OSError, ...
        raise ValueError(
            f"Cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): the file "
            "is missing, truncated or corrupt. Re-run `hf-distill export` or copy the folder again."
        ) from err


def export_positions(export_dir: Path) -> int:
    """Longest input the exported graph takes: the manifest's ``max_positions`` (older exports: from config.json)."""
    manifest_path = export_dir / "hf_distill_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("max_positions"):
        return int(manifest["max_positions"])
    from transformers import AutoConfig  # its attribute map knows GPT-2's n_positions and the like

    virtual = (manifest.get("prompt") or {}).get("num_virtual_tokens", 0)
    return usable_positions(AutoConfig.from_pretrained(str(export_dir)), default=10**9) - virtual


def _pytorch_specs(
    reference: dict[str, Any], student: Any, teacher: Any, teacher_metric: float | None, common: dict[str, Any]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    specs = []
    for name, folder, metric_value in (("teacher", teacher, teacher_metric), ("student", student, reference["value"])):
        if folder is not None:
            meta = {
                "engine": "pytorch",
                "variant": f"{name}_fp32",
                "size_mb": _size_mb(folder),
                "metric": reference["metric"],
                "metric_value": metric_value,
            }
            specs.append(({"engine": "pytorch", "path": str(folder), **common}, meta))
    return specs


def _onnx_specs(
    export_dir: Path, rows: dict[str, dict[str, Any]], chosen: list[str], common: dict[str, Any]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"] + (
        ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    )
    specs = []
    for variant in chosen:
        row = rows[variant]
        for provider in providers:
            meta = {
                "engine": f"onnxruntime-{provider.replace('ExecutionProvider', '').lower()}",
                "variant": variant,
                "size_mb": row["size_bytes"] / 1e6,
                "metric": row["metric"],
                "metric_value": row["metric_value"],
            }
            spec = {"engine": "onnxruntime", "path": str(export_dir / row["file"]), "provider": provider, **common}
            specs.append((spec, meta))
    return specs


def _write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(to_markdown(result))
    plot(result["rows"], out / "bench.png")
    for warning in result["warnings"]:
        logger.warning(warning)
        print(f"[bench] warning: {warning}")
    print(to_markdown(result, short=True))


def _int8_warnings(rows: list[dict[str, Any]]) -> list[str]:
    by_key = {(r["engine"], r["variant"], r["batch"], r["seq_len"]): r["p50_ms"] for r in rows}
    warnings = []
    for (engine, variant, batch, seq), p50 in by_key.items():
        fp32 = by_key.get((engine, "fp32", batch, seq))
        if variant.startswith("int8") and fp32 is not None and p50 > fp32:
            warnings.append(
                f"{variant} is slower than fp32 on this machine ({engine}, batch {batch}, seq {seq}: "
                f"{p50:.2f} vs {fp32:.2f} ms); the CPU may lack fast int8 instructions (VNNI)."
            )
    return warnings


def to_markdown(result: dict[str, Any], short: bool = False) -> str:
    m = result["machine"]
    lines = (
        []
        if short
        else [
            "# Benchmark",
            "",
            f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs; flags: {', '.join(m['cpu_flags']) or 'none'}); "
            f"threads: {m['threads']}; torch {m['torch']}, onnxruntime {m['onnxruntime']}. "
            f"{result['warmup']} warm-up runs, then {result['runs']} timed runs per row.",
            "",
        ]
    )
    header = [
        "engine",
        "variant",
        "batch",
        "seq_len",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "throughput_per_s",
        "peak_rss_mb",
        "size_mb",
        "metric",
    ]
    if short:
        header = ["engine", "variant", "batch", "seq_len", "p50_ms", "throughput_per_s", "size_mb", "metric"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        metric = "" if row.get("metric_value") is None else f"{row['metric']} {row['metric_value']:.2f}"
        values = {**row, "metric": metric}
        lines.append("| " + " | ".join(_fmt(values[h]) for h in header) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency (p50, smallest batch and sequence) against size, one point per engine/variant, labelled with metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch, seq = min(r["batch"] for r in rows), min(r["seq_len"] for r in rows)
    points = [r for r in rows if r["batch"] == batch and r["seq_len"] == seq]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in points:
        ax.scatter(r["size_mb"], r["p50_ms"], s=50)
        metric = "" if r.get("metric_value") is None else f"\n{r['metric']} {r['metric_value']:.2f}"
        ax.annotate(
            f"{r['variant']} ({r['engine']}){metric}",
            (r["size_mb"], r["p50_ms"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"p50 latency (ms), batch {batch}, seq {seq}")
    ax.set_title("Latency against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
