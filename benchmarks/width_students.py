"""Small students on SST-2: depth × width, pruned from the MiniLM-L6 teacher, distilled (with unlabelled text), int8.

For each ``LAYERSxHIDDEN`` in --configs and each seed in --seeds, a student is made with `create_student` (layers
chosen uniformly; when HIDDEN is below the teacher's 384, hidden channels, heads and MLP neurons pruned by activation
importance on --calibration training sentences), distilled with `DistillationTrainer` (KD on logits, alpha 0.5, T 2,
--epochs (default 1), lr 1e-4, batch 32) on the teacher's --train_size labelled sentences plus --unlabelled further
SST-2 training sentences without their labels (soft loss only; the teacher never saw them), and evaluated on SST-2 dev.
The teacher's logits are cached once (`cache_teacher_logits`, every class: exact) and every student trains from the
cache. Configs in --baseline are also trained on the labelled sentences alone (alpha 0) for the KD gain. The first
seed's KD student of each config is exported with `export_onnx(variants=["fp32", "int8_dynamic"])` (gate:
--max_metric_drop on the full dev set) and timed at batch 1, sequence 64 (p50 of PyTorch eager fp32 for the teacher
and each student, and of each student's int8 ONNX), each engine in a fresh process, in --rounds interleaved rounds.
Prints Markdown tables and the CPU, and writes JSON to --output.

    python benchmarks/width_students.py --unlabelled 32000 --seeds 1,2,3 --baseline 2x384
    python benchmarks/width_students.py --retime runs/benchmarks/width_students.json   # time again, quiet machine
    python benchmarks/width_students.py --retime runs/benchmarks/width_students.json --reexport  # export again, time
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer, cache_teacher_logits, create_student
from hf_distill.data import load_sst2, minilm_path, tokenize_text_classification
from hf_distill.export.bench import machine_info, measure_in_fresh_process
from hf_distill.export.onnx import export_onnx
from hf_distill.metrics import evaluate_accuracy
from hf_distill.teacher import finetune_teacher


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="Fine-tuned teacher folder (default: fine-tune one).")
    parser.add_argument(
        "--configs", default="3x384,4x256,4x192,6x128", help="LAYERSxHIDDEN[xINTERMEDIATE], comma-separated."
    )
    parser.add_argument("--train_size", type=int, default=16000)
    parser.add_argument(
        "--student_train_size",
        type=int,
        default=None,
        help="Distil on the first N of the teacher's training sentences (default: all of them, the pipeline's budget).",
    )
    parser.add_argument("--calibration", type=int, default=256, help="Training sentences for importance.")
    parser.add_argument("--seeds", default="1", help="Training seeds, comma-separated (accuracy: mean ± std).")
    parser.add_argument(
        "--unlabelled",
        type=int,
        default=0,
        help="Add N SST-2 training sentences outside the teacher's --train_size subset, unlabelled (soft loss only).",
    )
    parser.add_argument("--baseline", default="", help="Configs also trained on labels alone (alpha 0), per seed.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs of KD (or of labels only) per student.")
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
    parser.add_argument(
        "--reexport",
        action="store_true",
        help="With --retime: first export each saved student again with the current export_onnx (new int8 files).",
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


def distil(
    student: Any, train: Any, tokenizer: Any, alpha: float, seed: int, args: argparse.Namespace, out: Path
) -> None:
    """``--epochs`` of KD from the cached teacher logits in ``train`` (alpha 0: labels only)."""
    config = DistillationConfig(
        output_dir=str(out / "trainer"),
        alpha=alpha,
        temperature=2.0,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=32,
        warmup_steps=50,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_tqdm=True,
        logging_steps=100,
    )
    DistillationTrainer(
        model=student,
        teacher=None,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    ).train()


def make_student(name: str, teacher: Any, data: Any) -> Any:
    """``LAYERSxHIDDEN`` or ``LAYERSxHIDDENxINTERMEDIATE`` (MLP neurons pruned too) cut/pruned from the teacher."""
    layers, hidden, *intermediate = (int(x) for x in name.split("x"))
    width: dict[str, Any] = {} if hidden == teacher.config.hidden_size else {"hidden_size": hidden}
    if intermediate and intermediate[0] != teacher.config.intermediate_size:
        width["intermediate_size"] = intermediate[0]
    if width:
        width["calibration_data"] = data["calibration"]
    return create_student(teacher, num_layers=layers, **width)


def build_student(
    name: str, seed: int, kind: str, teacher: Any, data: Any, tokenizer: Any, args: argparse.Namespace, work: Path
) -> dict:
    """Prune/cut, distil (``kind`` "kd": labelled + unlabelled rows; "labels": labelled rows, alpha 0), evaluate;
    the first seed's KD student is also saved and exported. Returns its row (without latencies)."""
    started = time.time()
    student = make_student(name, teacher, data)
    accuracy_pruned = evaluate_accuracy(student, data["validation"], tokenizer)
    train = data["kd_train"] if kind == "kd" else data["labelled_train"]
    distil(student, train, tokenizer, 0.5 if kind == "kd" else 0.0, seed, args, work / f"{name}_{kind}_{seed}")
    c = student.config
    row = {
        "config": name,
        "kind": kind,
        "seed": seed,
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "heads": c.num_attention_heads,
        "parameters_m": sum(p.numel() for p in student.parameters()) / 1e6,
        "train_rows": len(train),
        "accuracy_before_kd": accuracy_pruned,
        "accuracy_fp32": evaluate_accuracy(student, data["validation"], tokenizer),
        "train_seconds": round(time.time() - started, 1),
    }
    if kind == "kd" and seed == int(args.seeds.split(",")[0]):
        row |= export_student(student, tokenizer, work / name, args)
    print(f"[{name} {kind} seed {seed}] {json.dumps(row)}", flush=True)
    return row


def export_student(student: Any, tokenizer: Any, folder: Path, args: argparse.Namespace) -> dict:
    student.save_pretrained(folder / "student")
    tokenizer.save_pretrained(folder / "student")
    return export_saved_student(folder, args)


def export_saved_student(folder: Path, args: argparse.Namespace) -> dict:
    """fp32 + int8 ONNX of ``folder/student`` into ``folder/onnx``, gated on the whole SST-2 dev set."""
    report = export_onnx(
        folder / "student",
        folder / "onnx",
        variants=["fp32", "int8_dynamic"],
        validation_data=load_sst2()["validation"],
        num_validation=872,
        max_metric_drop=args.max_metric_drop,
        fail_on_gate=False,
        overwrite=True,
    )
    int8 = next(r for r in report["variants"] if r["variant"] == "int8_dynamic")
    return {
        "accuracy_int8": int8["metric_value"],
        "int8_passed": int8["passed"],
        "int8_rung": int8["settings"].get("rung"),
        "int8_mb": int8["size_bytes"] / 1e6,
        "folder": str(folder / "student"),
        "int8_path": str(folder / "onnx" / int8["file"]),
    }


def time_all(teacher_dir: Path, rows: list[dict], args: argparse.Namespace, vocab: int) -> dict[str, list[float]]:
    """p50 ms of each engine in a fresh process per measurement, over interleaved rounds."""
    grid = {"batch_sizes": [1], "seq_lens": [64], "warmup": 20, "runs": args.runs, "threads": args.threads}
    specs = {"teacher/pytorch_fp32": {"engine": "pytorch", "path": str(teacher_dir), **grid}}
    for row in (r for r in rows if "int8_path" in r):
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


def seed_stats(rows: list[dict], config: str, kind: str) -> tuple[float, float, int]:
    """Mean and (sample) standard deviation of the fp32 dev accuracy over the seeds of one config and kind."""
    values = [r["accuracy_fp32"] for r in rows if r["config"] == config and r["kind"] == kind]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def table(teacher: Any, teacher_accuracy: float, rows: list[dict], medians: dict[str, float]) -> str:
    base = medians["teacher/pytorch_fp32"]
    c = teacher.config
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    lines = [
        "| student | intermediate, heads | parameters | train rows | dev acc after pruning "
        "| dev acc KD fp32 (seeds) | % of teacher | dev acc int8 (seed 1) | PyTorch fp32 p50 | int8 p50 "
        "| int8 vs teacher PyTorch fp32 | int8 file |",
        "|---" * 12 + "|",
        f"| teacher {c.num_hidden_layers}×{c.hidden_size} | {c.intermediate_size}, {c.num_attention_heads} "
        f"| {params:.1f}M | — | — | {teacher_accuracy:.2f} | 100 | — | {base:.2f} ms | — | 1.00× | — |",
    ]
    for r in (r for r in rows if "int8_path" in r):
        mean, std, n = seed_stats(rows, r["config"], "kd")
        fp32, int8 = medians[f"{r['config']}/pytorch_fp32"], medians[f"{r['config']}/int8"]
        lines.append(
            f"| {r['layers']}×{r['hidden']} | {r['intermediate']}, {r['heads']} | {r['parameters_m']:.1f}M "
            f"| {r['train_rows']} | {r['accuracy_before_kd']:.2f} | {mean:.2f} ± {std:.2f} ({n}) "
            f"| {100 * mean / teacher_accuracy:.1f} | {r['accuracy_int8']:.2f} ({r['int8_rung']}) | {fp32:.2f} ms "
            f"| {int8:.2f} ms | {base / int8:.2f}× | {r['int8_mb']:.1f} MB |"
        )
    return "\n".join(lines)


def gain_table(rows: list[dict]) -> str:
    """KD (labelled + unlabelled rows) against labels alone, per baseline config, over the same seeds."""
    lines = ["| student | labels only (seeds) | KD (seeds) | KD gain |", "|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in rows if r["kind"] == "labels"):
        (kd, kd_std, n), (hard, hard_std, m) = seed_stats(rows, config, "kd"), seed_stats(rows, config, "labels")
        lines.append(
            f"| {config} | {hard:.2f} ± {hard_std:.2f} ({m}) | {kd:.2f} ± {kd_std:.2f} ({n}) | {kd - hard:+.2f} |"
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
    if any(r["kind"] == "labels" for r in rows):
        print("\n" + gain_table(rows))
    result = {"args": vars(args), "machine": info, "teacher": str(teacher_dir), "teacher_accuracy": teacher_accuracy}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({**result, "rows": rows, "p50_ms": medians, "all_rounds_ms": times}, indent=2)
    )


def load_data(tokenizer: Any, args: argparse.Namespace) -> Any:
    """Tokenized labelled training rows (the teacher's), unlabelled rows outside them, calibration rows and dev."""
    import datasets

    raw = load_sst2()
    # load_sst2(train_size=N) takes the first N rows of this shuffle: the rows after them are unseen by the teacher.
    shuffled = raw["train"].shuffle(seed=42)
    labelled = shuffled.select(range(args.train_size))
    if args.train_size + args.unlabelled > len(shuffled):
        raise SystemExit(f"--unlabelled {args.unlabelled}: SST-2 has {len(shuffled) - args.train_size} rows left.")
    text = shuffled.select(range(args.train_size, args.train_size + args.unlabelled)).remove_columns("label")
    splits = datasets.DatasetDict(train=labelled, validation=raw["validation"])
    data = tokenize_text_classification(tokenizer, splits, "sentence", "label", 64)
    data["calibration"] = data["train"].select(range(args.calibration))
    if args.unlabelled:
        data["unlabelled"] = tokenize_text_classification(
            tokenizer, datasets.DatasetDict(unlabelled=text), "sentence", None, 64
        )["unlabelled"]
    return data


def cache_logits(teacher: Any, data: Any, tokenizer: Any, args: argparse.Namespace, work: Path) -> None:
    """The teacher's logits (every class) on labelled + unlabelled rows, once; reused by every student and seed."""
    import datasets

    labelled = data["train"]
    if args.student_train_size:
        labelled = labelled.select(range(min(args.student_train_size, len(labelled))))
    rows = datasets.concatenate_datasets([labelled, data["unlabelled"]]) if "unlabelled" in data else labelled
    path = work / f"teacher_logits_{len(labelled)}_{len(rows) - len(labelled)}"
    if path.is_dir():
        cached = datasets.load_from_disk(str(path))
    else:
        collator = DataCollatorWithPadding(tokenizer)
        cached = cache_teacher_logits(teacher, rows, top_k=None, batch_size=64, data_collator=collator)
        cached.save_to_disk(str(path))
    data["kd_train"] = cached
    data["labelled_train"] = cached.select(range(len(labelled)))


def main() -> None:
    args = parse_args()
    if args.retime:
        earlier = json.loads(Path(args.retime).read_text())
        if args.reexport:  # the saved students through today's export (the timed int8 files change)
            for row in (r for r in earlier["rows"] if "int8_path" in r):
                row |= export_saved_student(Path(row["folder"]).parent, args)
                accuracy, rung = row["accuracy_int8"], row["int8_rung"]
                print(f"[{row['config']}] re-exported: int8 dev accuracy {accuracy:.2f} ({rung})", flush=True)
        teacher = earlier.get("teacher") or earlier["args"]["teacher"] or Path(earlier["args"]["work_dir"]) / "teacher"
        report(args, Path(teacher), earlier["teacher_accuracy"], earlier["rows"])
        return
    work = Path(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher or minilm_path())
    data = load_data(tokenizer, args)
    teacher_dir = get_teacher(args, data, work)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    teacher_accuracy = evaluate_accuracy(teacher, data["validation"], tokenizer)
    print(f"teacher dev accuracy {teacher_accuracy:.2f}", flush=True)
    if args.pruning_only:
        compare_importance(teacher, data, tokenizer, args)
        return
    cache_logits(teacher, data, tokenizer, args, work)
    seeds = [int(x) for x in args.seeds.split(",")]
    # Seed-major, so that an interrupted run has every config at its first seeds (rows so far: OUTPUT.partial).
    runs = [(name, seed, "kd") for seed in seeds for name in args.configs.split(",")]
    runs += [(name, seed, "labels") for seed in seeds for name in filter(None, args.baseline.split(","))]
    runs.sort(key=lambda run: seeds.index(run[1]))
    rows: list[dict] = []
    partial = Path(f"{args.output}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for name, seed, kind in runs:
        rows.append(build_student(name, seed, kind, teacher, data, tokenizer, args, work))
        partial.write_text(
            json.dumps({"teacher": str(teacher_dir), "teacher_accuracy": teacher_accuracy, "rows": rows})
        )
    report(args, teacher_dir, teacher_accuracy, rows)


if __name__ == "__main__":
    main()
