"""Export targets: int8 vs PyTorch eager fp32 and vs onnxruntime's default `quantize_dynamic`, at batch 1, seq 64.

For the fine-tuned MiniLM-L6 teacher and the 3-layer student of the main job (`runs/sst2_minilm`, produced by
`python recipes/text_classification.py recipes/configs/sst2_minilm.yaml`; run first if missing):
  1. `export_onnx(..., variants=["fp32", "int8_dynamic"], max_metric_drop=0.5)` on the full SST-2 dev set,
  2. onnxruntime's `quantize_dynamic(model.onnx, ...)` with default settings on the same fp32 export (baseline),
  3. latency of PyTorch eager fp32, our int8 and the baseline int8, each engine in its own process, in `--rounds`
     interleaved rounds; the medians and side-by-side ratios are printed as a Markdown table and saved as JSON.

    python benchmarks/export_speed.py --run-dir runs/sst2_minilm --rounds 3
    python benchmarks/export_speed.py --run-dir runs/sst2_pipeline --student runs/benchmarks/best_3_layers

The last line also gives the issue's headline ratio: the int8 student against the teacher in PyTorch fp32 (both
timed in the same interleaved rounds) and the student's int8 accuracy next to the teacher's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hf_distill.data import load_sst2
from hf_distill.export.bench import machine_info, measure_in_fresh_process
from hf_distill.export.onnx import export_onnx


def _time(spec: dict) -> float:
    return measure_in_fresh_process(spec)[0]["p50_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/sst2_minilm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--student", default=None, help="Student folder (default: RUN_DIR/student).")
    args = parser.parse_args()
    run = Path(args.run_dir)
    folders = {"teacher": run / "teacher", "student": Path(args.student) if args.student else run / "student"}
    dev = load_sst2()["validation"]
    grid = {"batch_sizes": [1], "seq_lens": [64], "warmup": 20, "runs": args.runs, "threads": args.threads}
    results = {"machine": machine_info(args.threads), "models": {}}
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} missing: run the main job first (see this script's docstring).")
        out = run / f"onnx_{name}"
        report = export_onnx(
            folder,
            out,
            variants=["fp32", "int8_dynamic"],
            validation_data=dev,
            num_validation=872,
            max_metric_drop=0.5,
            overwrite=True,
        )
        from onnxruntime.quantization import quantize_dynamic

        baseline = out / "baseline_ort_default_int8.onnx"
        quantize_dynamic(str(out / "model.onnx"), str(baseline))  # onnxruntime defaults, nothing else
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        specs = {
            "pytorch_fp32": {"engine": "pytorch", "path": str(folder), **grid},
            "ours_int8": {
                "engine": "onnxruntime",
                "path": str(out / "model_int8.onnx"),
                "provider": "CPUExecutionProvider",
                "vocab": vocab,
                **grid,
            },
            "ort_default_int8": {
                "engine": "onnxruntime",
                "path": str(baseline),
                "provider": "CPUExecutionProvider",
                "vocab": vocab,
                **grid,
            },
        }
        times: dict[str, list[float]] = {k: [] for k in specs}
        for round_index in range(args.rounds):
            for key, spec in specs.items():
                times[key].append(_time(spec))
            print(f"[{name}] round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in times.items()))
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows = {r["variant"]: r for r in report["variants"]}
        results["models"][name] = {
            "p50_ms": medians,
            "all_rounds_ms": times,
            "speedup_int8_vs_pytorch": medians["pytorch_fp32"] / medians["ours_int8"],
            "int8_vs_ort_default": medians["ours_int8"] / medians["ort_default_int8"],
            "accuracy_pytorch": report["reference"]["value"],
            "accuracy_int8": rows["int8_dynamic"]["metric_value"],
            "int8_drop_points": rows["int8_dynamic"]["metric_drop"],
            "int8_rung": rows["int8_dynamic"]["settings"].get("rung"),
        }
    print(
        "\n| model | PyTorch fp32 p50 ms | int8 p50 ms | ORT-default int8 p50 ms | speed-up vs PyTorch | "
        "ours / ORT default | dev acc fp32 | dev acc int8 | drop |\n" + "|---" * 9 + "|"
    )
    for name, r in results["models"].items():
        m = r["p50_ms"]
        print(
            f"| {name} | {m['pytorch_fp32']:.2f} | {m['ours_int8']:.2f} | {m['ort_default_int8']:.2f} | "
            f"{r['speedup_int8_vs_pytorch']:.2f}x | {r['int8_vs_ort_default']:.2f} | {r['accuracy_pytorch']:.2f} | "
            f"{r['accuracy_int8']:.2f} | {r['int8_drop_points']:.2f} ({r['int8_rung']}) |"
        )
    teacher, student = results["models"]["teacher"], results["models"]["student"]
    results["student_int8_vs_teacher_pytorch"] = {
        "speedup": teacher["p50_ms"]["pytorch_fp32"] / student["p50_ms"]["ours_int8"],
        "accuracy_points_below_teacher": teacher["accuracy_pytorch"] - student["accuracy_int8"],
    }
    cross = results["student_int8_vs_teacher_pytorch"]
    print(
        f"\nint8 student ({folders['student']}) vs fp32 teacher in PyTorch: {cross['speedup']:.2f}x faster, "
        f"{cross['accuracy_points_below_teacher']:.2f} accuracy points below it."
    )
    (run / "export_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
