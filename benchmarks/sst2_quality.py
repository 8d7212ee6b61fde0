"""SST-2 quality: students cut from the fine-tuned MiniLM-L6 teacher, with and without KD, over several seeds.

For each student depth and each mode (labels only / KD on logits / KD on logits + hidden states) and seed, a
student is cut from the teacher with `create_student`, trained for one epoch on the same SST-2 training subset, and
evaluated on the full dev set. Prints a Markdown table (mean ± std of dev accuracy, share of the teacher's accuracy,
KD gain) and writes the raw numbers to --output (JSON).

    python benchmarks/sst2_quality.py --teacher runs/sst2_pipeline/teacher --train_size 8000 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.data import load_sst2, tokenize_text_classification
from hf_distill.metrics import evaluate_accuracy

MODES = {
    "no_kd": {"alpha": 0.0},
    "kd_logits": {"alpha": 0.5, "temperature": 2.0},
    "kd_logits_hidden": {"alpha": 0.5, "temperature": 2.0, "hidden_loss_weight": 1.0, "hidden_loss": "cosine"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/sst2_pipeline/teacher")
    parser.add_argument("--train_size", type=int, default=8000)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--layers", default="3,2")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--output", default="runs/benchmarks/sst2_quality.json")
    parser.add_argument(
        "--save_best", default=None, help="Save the most accurate student of each depth to SAVE_BEST/best_<n>_layers."
    )
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    data = tokenize_text_classification(
        tokenizer, load_sst2(train_size=args.train_size, seed=0), "sentence", "label", 64
    )
    teacher_accuracy = evaluate_accuracy(teacher, data["validation"], tokenizer)
    print(f"teacher dev accuracy {teacher_accuracy:.2f}")
    runs = []
    best: dict[int, float] = {}
    for layers in [int(x) for x in args.layers.split(",")]:
        for mode in args.modes.split(","):
            for seed in [int(x) for x in args.seeds.split(",")]:
                started = time.time()
                config = DistillationConfig(
                    output_dir=f"runs/benchmarks/tmp_{layers}_{mode}_{seed}",
                    num_train_epochs=1,
                    learning_rate=1e-4,
                    per_device_train_batch_size=32,
                    warmup_steps=50,
                    train_sampling_strategy="group_by_length",
                    save_strategy="no",
                    report_to="none",
                    seed=seed,
                    disable_tqdm=True,
                    logging_steps=100,
                    **MODES[mode],
                )
                student = create_student(teacher, num_layers=layers)
                DistillationTrainer(
                    model=student,
                    teacher=teacher,
                    args=config,
                    train_dataset=data["train"],
                    processing_class=tokenizer,
                    data_collator=DataCollatorWithPadding(tokenizer),
                ).train()
                accuracy = evaluate_accuracy(student, data["validation"], tokenizer)
                runs.append(
                    {
                        "layers": layers,
                        "mode": mode,
                        "seed": seed,
                        "accuracy": accuracy,
                        "seconds": round(time.time() - started, 1),
                    }
                )
                print(f"layers={layers} mode={mode} seed={seed}: {accuracy:.2f} ({runs[-1]['seconds']} s)", flush=True)
                if args.save_best and accuracy > best.get(layers, -1.0):
                    best[layers] = accuracy
                    folder = Path(args.save_best) / f"best_{layers}_layers"
                    student.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                    (folder / "benchmark_run.json").write_text(json.dumps(runs[-1], indent=2))
    summary = {}
    for layers in sorted({r["layers"] for r in runs}, reverse=True):
        for mode in args.modes.split(","):
            values = [r["accuracy"] for r in runs if r["layers"] == layers and r["mode"] == mode]
            summary[f"{layers}_{mode}"] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    print(
        f"\nTeacher (6 layers): {teacher_accuracy:.2f}. Train subset: {args.train_size} sentences, 1 epoch, seeds "
        f"{args.seeds}.\n\n| student | mode | dev accuracy (mean ± std) | % of teacher | gain over no KD |\n"
        + "|---" * 5
        + "|"
    )
    for key, value in summary.items():
        layers, mode = key.split("_", 1)
        baseline = summary.get(f"{layers}_no_kd")
        gain = f"{value['mean'] - baseline['mean']:+.2f}" if baseline and mode != "no_kd" else "—"
        print(
            f"| {layers} layers | {mode} | {value['mean']:.2f} ± {value['std']:.2f} | "
            f"{100 * value['mean'] / teacher_accuracy:.1f} | {gain} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps(
            {"teacher_accuracy": teacher_accuracy, "train_size": args.train_size, "runs": runs, "summary": summary},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
