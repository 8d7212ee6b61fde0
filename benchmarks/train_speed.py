"""Training speed and memory: plain `Trainer` fine-tuning of a student vs `DistillationTrainer` with an online
teacher vs with cached teacher logits (same student, data, batch and steps). Each mode runs in a fresh process, so
its peak RSS is its own; modes are interleaved over --rounds and the medians reported.

    python benchmarks/train_speed.py --teacher runs/sst2_pipeline/teacher --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _run(mode: str, teacher_dir: str, student_dir: str, cache_dir: str, steps: int, batch: int) -> dict:
    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_distill import DistillationConfig, DistillationTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    # Only the online mode loads the teacher, so each mode's peak RSS holds exactly what it needs.
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    data = datasets.load_from_disk(cache_dir)
    common = dict(
        output_dir="runs/benchmarks/tmp_speed",
        max_steps=steps,
        per_device_train_batch_size=batch,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        logging_steps=10_000,
    )
    collator = DataCollatorWithPadding(tokenizer)
    if mode == "plain_trainer":
        data = data.remove_columns([c for c in data.column_names if c.startswith("teacher_")])
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=data, data_collator=collator)
    else:
        online = mode == "kd_online_teacher"
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir) if online else None
        if online:
            data = data.remove_columns([c for c in data.column_names if c.startswith("teacher_")])
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher if online else None,
            args=DistillationConfig(alpha=0.5, temperature=2.0, **common),
            train_dataset=data,
            data_collator=collator,
        )
    metrics = trainer.train().metrics
    return {
        "mode": mode,
        "seconds_per_step": metrics["train_runtime"] / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/sst2_pipeline/teacher")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="runs/benchmarks/train_speed.json")
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_distill import cache_teacher_logits, create_student
    from hf_distill.data import load_sst2, tokenize_text_classification

    cache_dir = "runs/benchmarks/sst2_teacher_cache"
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    data = tokenize_text_classification(
        tokenizer, load_sst2(train_size=args.steps * args.batch, seed=0), "sentence", "label", 64
    )["train"].remove_columns("length")
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    cache_teacher_logits(teacher, data, top_k=None, temperature=2.0, save_path=cache_dir)
    student_dir = "runs/benchmarks/student_3_layers"
    create_student(teacher, num_layers=3).save_pretrained(student_dir)
    modes = ["plain_trainer", "kd_online_teacher", "kd_cached_logits"]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    context = multiprocessing.get_context("spawn")
    for _ in range(args.rounds):
        for mode in modes:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results[mode].append(
                    pool.submit(_run, mode, args.teacher, student_dir, cache_dir, args.steps, args.batch).result()
                )
            print(results[mode][-1], flush=True)
    base = statistics.median(r["seconds_per_step"] for r in results["plain_trainer"])
    print(
        f"\n{args.steps} steps, batch {args.batch}, 3-layer student of {args.teacher}; medians of {args.rounds} "
        "rounds.\n\n| mode | s/step | ratio to plain Trainer | peak RSS MB |\n|---|---|---|---|"
    )
    summary = {}
    for mode in modes:
        step = statistics.median(r["seconds_per_step"] for r in results[mode])
        rss = statistics.median(r["peak_rss_mb"] for r in results[mode])
        summary[mode] = {"seconds_per_step": step, "ratio": step / base, "peak_rss_mb": rss}
        print(f"| {mode} | {step:.3f} | {step / base:.2f} | {rss:.0f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
