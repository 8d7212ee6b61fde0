"""Width-reduced students on SST-2: depth × width, pruned from the MiniLM-L6 teacher, distilled, exported to int8.

For each ``LAYERSxHIDDEN`` in --configs, a student is made with `create_student` (layers chosen uniformly; when
HIDDEN is below the teacher's 384, hidden channels, heads and MLP neurons pruned by activation importance on
--calibration training sentences), distilled with `DistillationTrainer` (KD on logits, alpha 0.5, T 2, one epoch,
lr 1e-4, batch 32; by default on the teacher's --train_size sentences, the main pipeline's budget, or on the first
--student_train_size of them), evaluated on SST-2 dev, exported with `export_onnx(variants=["fp32", "int8_dynamic"])`
(gate: --max_metric_drop on the full dev set), and timed at batch 1, sequence 64 (p50 of PyTorch eager fp32 for the
teacher and each student, and of each student's int8 ONNX), each engine in a fresh process, in --rounds interleaved
rounds. Prints a Markdown table and the CPU, and writes JSON to --output.

    python benchmarks/width_students.py --teacher runs/sst2_pipeline/teacher
    python benchmarks/width_students.py            # fine-tunes its own teacher first (16k sentences, 1 epoch)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.data import load_sst2, minilm_path, tokenize_text_classification
from hf_distill.export.bench import machine_info, measure_in_fresh_process
from hf_distill.export.onnx import export_onnx
from hf_distill.metrics import evaluate_accuracy
from hf_distill.teacher import finetune_teacher


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="Fine-tuned teacher folder (default: fine-tune one).")
    parser.add_argument("--configs", default="3x384,4x256,4x192,6x128", help="LAYERSxHIDDEN, comma-separated.")
    parser.add_argument("--train_size", type=int, default=16000)
    parser.add_argument(
        "--student_train_size",
        type=int,
        default=None,
        help="Distil on the first N of the teacher's training sentences (default: all of them, the pipeline's budget).",
    )
    parser.add_argument("--calibration", type=int, default=256, help="Training sentences for importance.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_metric_drop", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--pruning_only",
        action="store_true",
        help="Only compare dev accuracy right after pruning: activation importance vs weight magnitude (no training).",
    )
    parser.add_argument("--threads", type=int, default=None, help="Threads per engine when timing (default: all).")
    parser.add_argument(
        "--retime",
        default=None,
        help="Only time again the teacher and students of an earlier run's --output JSON (e.g. with --threads 1).",
    )
    parser.add_argument("--work_dir", default="runs/benchmarks/width_students")
    parser.add_argument("--output", default="runs/benchmarks/width_students.json")
    return parser.parse_args()


def get_teacher(args: argparse.Namespace, data: Any, work: Path) -> Path:
    """The teacher folder: --teacher, or MiniLM-L6 fine-tuned here as the pipeline does (1 epoch, lr 1e-4)."""
    if args.teacher:
        return Path(args.teacher)
    folder = work / "teacher"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        finetune_teacher(minilm_path(), data, tokenizer, folder, epochs=1, learning_rate=1e-4, batch_size=32, seed=42)
        tokenizer.save_pretrained(folder)
    return folder


def distil(student: Any, teacher: Any, data: Any, tokenizer: Any, args: argparse.Namespace, out: Path) -> None:
    config = DistillationConfig(
        output_dir=str(out / "trainer"),
        alpha=0.5,
        temperature=2.0,
        num_train_epochs=1,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=32,
        warmup_steps=50,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
        logging_steps=100,
    )
    DistillationTrainer(
        model=student,
        teacher=teacher,
        args=config,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    ).train()


def build_student(name: str, teacher: Any, data: Any, tokenizer: Any, args: argparse.Namespace, work: Path) -> dict:
    """Prune/cut, distil, evaluate, save and export one student; returns its row (without latencies)."""
    layers, hidden = (int(x) for x in name.split("x"))
    started = time.time()
    width = {} if hidden == teacher.config.hidden_size else {"hidden_size": hidden}
    if width:
        width["calibration_data"] = data["train"].select(range(args.calibration))
    student = create_student(teacher, num_layers=layers, **width)
    accuracy_pruned = evaluate_accuracy(student, data["validation"], tokenizer)
    distil(student, teacher, data, tokenizer, args, work / name)
    folder = work / name / "student"
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    report = export_onnx(
        folder,
        work / name / "onnx",
        variants=["fp32", "int8_dynamic"],
        validation_data=load_sst2()["validation"],
        num_validation=872,
        max_metric_drop=args.max_metric_drop,
        fail_on_gate=False,
        overwrite=True,
    )
    int8 = next(r for r in report["variants"] if r["variant"] == "int8_dynamic")
    c = student.config
    row = {
        "config": name,
        "layers": layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "heads": c.num_attention_heads,
        "parameters_m": sum(p.numel() for p in student.parameters()) / 1e6,
        "accuracy_before_kd": accuracy_pruned,
        "accuracy_fp32": report["reference"]["value"],
        "accuracy_int8": int8["metric_value"],
        "int8_passed": int8["passed"],
        "int8_rung": int8["settings"].get("rung"),
        "int8_mb": int8["size_bytes"] / 1e6,
        "folder": str(folder),
        "int8_path": str(work / name / "onnx" / int8["file"]),
        "train_seconds": round(time.time() - started, 1),
    }
    print(f"[{name}] {json.dumps(row)}", flush=True)
    return row


def time_all(teacher_dir: Path, rows: list[dict], args: argparse.Namespace, vocab: int) -> dict[str, list[float]]:
    """p50 ms of each engine in a fresh process per measurement, over interleaved rounds."""
    grid = {"batch_sizes": [1], "seq_lens": [64], "warmup": 20, "runs": args.runs, "threads": args.threads}
    specs = {"teacher/pytorch_fp32": {"engine": "pytorch", "path": str(teacher_dir), **grid}}
    for row in rows:
        specs[f"{row['config']}/pytorch_fp32"] = {"engine": "pytorch", "path": row["folder"], **grid}
        specs[f"{row['config']}/int8"] = {
            "engine": "onnxruntime",
            "path": row["int8_path"],
            "provider": "CPUExecutionProvider",
            "vocab": vocab,
            **grid,
        }
    times: dict[str, list[float]] = {key: [] for key in specs}
    for round_index in range(args.rounds):
        for key, spec in specs.items():
            times[key].append(measure_in_fresh_process(spec)[0]["p50_ms"])
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
    return times


def table(teacher: Any, teacher_accuracy: float, rows: list[dict], medians: dict[str, float]) -> str:
    base = medians["teacher/pytorch_fp32"]
    c = teacher.config
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    lines = [
        "| student | intermediate, heads | parameters | dev acc after pruning | dev acc KD fp32 | dev acc int8 "
        "| % of teacher (int8) | PyTorch fp32 p50 | int8 p50 | int8 vs teacher PyTorch fp32 | int8 file |",
        "|---" * 11 + "|",
        f"| teacher {c.num_hidden_layers}×{c.hidden_size} | {c.intermediate_size}, {c.num_attention_heads} "
        f"| {params:.1f}M | — | {teacher_accuracy:.2f} | — | 100 | {base:.2f} ms | — | 1.00× | — |",
    ]
    for r in rows:
        fp32, int8 = medians[f"{r['config']}/pytorch_fp32"], medians[f"{r['config']}/int8"]
        lines.append(
            f"| {r['layers']}×{r['hidden']} | {r['intermediate']}, {r['heads']} | {r['parameters_m']:.1f}M "
            f"| {r['accuracy_before_kd']:.2f} | {r['accuracy_fp32']:.2f} | {r['accuracy_int8']:.2f} ({r['int8_rung']}) "
            f"| {100 * r['accuracy_int8'] / teacher_accuracy:.1f} | {fp32:.2f} ms | {int8:.2f} ms | {base / int8:.2f}× "
            f"| {r['int8_mb']:.1f} MB |"
        )
    return "\n".join(lines)


def compare_importance(teacher: Any, data: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    """Dev accuracy of each pruned student before any training, ranked by activations vs by weight magnitude."""
    print("\n| student | dev acc, activation importance | dev acc, weight magnitude |\n|---|---|---|")
    for name in args.configs.split(","):
        layers, hidden = (int(x) for x in name.split("x"))
        accuracies = []
        for calibration in (data["train"].select(range(args.calibration)), None):
            student = create_student(teacher, num_layers=layers, hidden_size=hidden, calibration_data=calibration)
            accuracies.append(evaluate_accuracy(student, data["validation"], tokenizer))
        print(f"| {layers}×{hidden} | {accuracies[0]:.2f} | {accuracies[1]:.2f} |", flush=True)


def report(args: argparse.Namespace, teacher_dir: Path, teacher_accuracy: float, rows: list[dict]) -> None:
    """Time every engine, print the machine and the table, write the JSON."""
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    times = time_all(teacher_dir, rows, args, teacher.config.vocab_size)
    medians = {key: statistics.median(values) for key, values in times.items()}
    info = machine_info(args.threads)
    print(
        f"\nCPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, flags {info['cpu_flags']}, threads "
        f"{info['threads']}\n"
    )
    print(table(teacher, teacher_accuracy, rows, medians))
    result = {"args": vars(args), "machine": info, "teacher": str(teacher_dir), "teacher_accuracy": teacher_accuracy}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({**result, "rows": rows, "p50_ms": medians, "all_rounds_ms": times}, indent=2)
    )


def main() -> None:
    args = parse_args()
    if args.retime:
        earlier = json.loads(Path(args.retime).read_text())
        teacher = earlier.get("teacher") or earlier["args"]["teacher"] or Path(earlier["args"]["work_dir"]) / "teacher"
        report(args, Path(teacher), earlier["teacher_accuracy"], earlier["rows"])
        return
    work = Path(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher or minilm_path())
    data = tokenize_text_classification(tokenizer, load_sst2(train_size=args.train_size), "sentence", "label", 64)
    teacher_dir = get_teacher(args, data, work)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    teacher_accuracy = evaluate_accuracy(teacher, data["validation"], tokenizer)
    print(f"teacher dev accuracy {teacher_accuracy:.2f}", flush=True)
    if args.pruning_only:
        compare_importance(teacher, data, tokenizer, args)
        return
    if args.student_train_size:
        data["train"] = data["train"].select(range(min(args.student_train_size, len(data["train"]))))
    rows = [build_student(name, teacher, data, tokenizer, args, work) for name in args.configs.split(",")]
    report(args, teacher_dir, teacher_accuracy, rows)


if __name__ == "__main__":
    main()
