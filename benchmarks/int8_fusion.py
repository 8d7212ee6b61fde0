"""Where the int8 encoder's time goes: exporter (dynamo vs TorchScript) × quantized fused vs unfused, batch 1 × 64.

For one saved encoder (e.g. a student of `benchmarks/width_students.py`), in a scratch folder:
  1. `export_onnx(variants=["fp32", "int8_dynamic"])` with `$HF_DISTILL_ONNX_EXPORTER` pinned to each exporter:
     its `model_int8.onnx` is quantized after onnxruntime's transformer fusions (what the export does),
  2. onnxruntime's `quantize_dynamic` of the same unfused `model.onnx` (the graph as exported, not fused),
  3. p50 of the four int8 files, each in a fresh process, over `--rounds` interleaved rounds.

    HF_HUB_OFFLINE=1 python benchmarks/int8_fusion.py runs/benchmarks/width_intel/3x384/student --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import onnx

from hf_distill.data import load_sst2
from hf_distill.export.bench import machine_info, measure_in_fresh_process
from hf_distill.export.onnx import export_onnx


def build(student: Path, work: Path, exporter: str) -> dict[str, Path]:
    """The fused (ours) and unfused (plain quantize_dynamic) int8 files of one exporter's graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.environ["HF_DISTILL_ONNX_EXPORTER"] = exporter
    out = work / exporter
    report = export_onnx(
        student,
        out,
        variants=["fp32", "int8_dynamic"],
        validation_data=load_sst2()["validation"],
        num_validation=872,
        max_metric_drop=1.0,
        fail_on_gate=False,
        overwrite=True,
    )
    fused = next(r for r in report["variants"] if r["variant"] == "int8_dynamic")["settings"]["fused_operators"]
    print(f"[{exporter}] fused before quantization: {fused}", flush=True)
    unfused = out / "int8_unfused.onnx"
    # the export's own settings (signed weights, float default type), only the fusions left out
    quantize_dynamic(
        str(out / "model.onnx"),
        str(unfused),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {f"{exporter}, fused": out / "model_int8.onnx", f"{exporter}, unfused": unfused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="A saved encoder folder (config.json, safetensors, tokenizer).")
    parser.add_argument("--work_dir", default="runs/benchmarks/int8_fusion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    student, work = Path(args.student), Path(args.work_dir)
    if not (student / "config.json").is_file():
        raise SystemExit(f"{student} has no config.json: pass a saved model folder.")
    files = {**build(student, work, "dynamo"), **build(student, work, "torchscript")}
    vocab = json.loads((student / "config.json").read_text())["vocab_size"]
    grid = {"batch_sizes": [1], "seq_lens": [64], "warmup": 20, "runs": args.runs, "threads": None}
    times: dict[str, list[float]] = {k: [] for k in files}
    for round_index in range(args.rounds):
        for key, path in files.items():
            spec = {"engine": "onnxruntime", "path": str(path), "provider": "CPUExecutionProvider", "vocab": vocab}
            times[key].append(measure_in_fresh_process({**spec, **grid})[0]["p50_ms"])
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in times.items()), flush=True)
    info = machine_info(None)
    print(f"\nCPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, flags {info['cpu_flags']}\n")
    print("| int8 graph, batch 1 × 64 | p50 ms |\n|---|---|")
    for key, values in times.items():
        print(f"| {key} | {statistics.median(values):.2f} |")
    (work / "int8_fusion.json").write_text(json.dumps({"machine": info, "all_rounds_ms": times}, indent=2))


if __name__ == "__main__":
    main()
