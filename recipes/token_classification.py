"""Distil a token classifier (NER, POS, ...) into a smaller student.

Data: JSON-lines files with one example per line, `{"tokens": ["EU", "rejects", ...], "tags": ["B-ORG", "O", ...]}`
(CoNLL-style words and their tags). The words are joined into running text and split into sub-words by the teacher's
tokenizer, so a byte-level BPE tokenizer (GPT-2, RoBERTa) sees `Ġking` for a non-initial word as it does at
inference; only the first sub-word of each word carries its tag, the rest get -100 (ignored by the hard and KD loss).

Stages: fine-tune the teacher backbone on the tags (unless --teacher_is_finetuned) -> cut a student with
`create_student` -> KD with `DistillationTrainer` -> token accuracy / macro-F1 of both on the validation file.

    python recipes/token_classification.py --train_file train.jsonl --validation_file dev.jsonl \\
        --output_dir runs/ner --num_train_epochs 3
    accelerate launch --multi_gpu --num_processes 2 recipes/token_classification.py ... --use_cpu true
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import datasets
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
)

from hf_distill import DistillationConfig, DistillationTrainer, classification_metrics, create_student
from hf_distill.arguments import parse_recipe_args, run_recipe
from hf_distill.data import minilm_path, tokenize_tagged_words


@dataclass
class ScriptArguments:
    train_file: str = field(metadata={"help": "JSON-lines training file with 'tokens' and 'tags'."})
    validation_file: str = field(metadata={"help": "JSON-lines validation file with 'tokens' and 'tags'."})
    teacher: str = field(default="minilm", metadata={"help": "Backbone folder/Hub id, or 'minilm' (offline package)."})
    teacher_is_finetuned: bool = field(default=False, metadata={"help": "The teacher already has a trained head."})
    teacher_epochs: float = field(default=3.0, metadata={"help": "Epochs of teacher fine-tuning."})
    student_layers: int = field(default=3, metadata={"help": "Layers of the student cut from the teacher."})
    max_length: int = field(default=128, metadata={"help": "Truncate to this many sub-word tokens."})


def load_tagged(script: ScriptArguments) -> tuple[datasets.DatasetDict, list[str]]:
    for path in (script.train_file, script.validation_file):
        if not os.path.isfile(path):
            raise SystemExit(f"Data file {path!r} does not exist.")
    raw = datasets.load_dataset("json", data_files={"train": script.train_file, "validation": script.validation_file})
    for split in raw.values():
        missing = {"tokens", "tags"} - set(split.column_names)
        if missing:
            raise SystemExit(f"Data files need columns 'tokens' and 'tags'; missing {sorted(missing)}.")
    labels = sorted({tag for split in raw.values() for tags in split["tags"] for tag in tags})
    return raw, labels


def align(tokenizer, raw: datasets.DatasetDict, labels: list[str], max_length: int) -> datasets.DatasetDict:
    """Sub-words as in running text, the tag on each word's first sub-word (hf_distill.data.tokenize_tagged_words)."""
    return tokenize_tagged_words(tokenizer, raw, labels, max_length)


def main(argv: list[str] | None = None) -> dict:
    script, args = parse_recipe_args((ScriptArguments, DistillationConfig), argv)
    raw, labels = load_tagged(script)
    source = minilm_path() if script.teacher == "minilm" else script.teacher
    tokenizer = AutoTokenizer.from_pretrained(source)
    data = align(tokenizer, raw, labels, script.max_length)
    collator = DataCollatorForTokenClassification(tokenizer)
    id2label = dict(enumerate(labels))
    teacher_dir = script.teacher if script.teacher_is_finetuned else os.path.join(args.output_dir, "teacher")
    if not script.teacher_is_finetuned and not os.path.isfile(os.path.join(teacher_dir, "model.safetensors")):
        model = AutoModelForTokenClassification.from_pretrained(
            source, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()}
        )
        teacher_args = TrainingArguments(
            output_dir=os.path.join(args.output_dir, "teacher_checkpoints"),
            num_train_epochs=script.teacher_epochs,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=args.use_cpu,
            max_steps=args.max_steps,
            disable_tqdm=args.disable_tqdm,
        )
        trainer = Trainer(
            model=model,
            args=teacher_args,
            train_dataset=data["train"],
            data_collator=collator,
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(teacher_dir)
    teacher = AutoModelForTokenClassification.from_pretrained(teacher_dir)
    student = create_student(teacher, num_layers=script.student_layers)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "student"))
    student_metrics = trainer.evaluate()
    teacher_metrics = Trainer(
        model=teacher,
        args=TrainingArguments(
            output_dir=os.path.join(args.output_dir, "eval"), report_to="none", use_cpu=args.use_cpu
        ),
        data_collator=collator,
        compute_metrics=classification_metrics,
    ).evaluate(data["validation"])
    results = {
        "labels": labels,
        "teacher": {k: teacher_metrics[f"eval_{k}"] for k in ("accuracy", "f1")},
        "student": {k: student_metrics[f"eval_{k}"] for k in ("accuracy", "f1")},
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": script.student_layers,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print("\n| model | token accuracy | macro-F1 |\n|---|---|---|")
        for name in ("teacher", "student"):
            print(f"| {name} | {100 * results[name]['accuracy']:.2f} | {100 * results[name]['f1']:.2f} |")
    return results


if __name__ == "__main__":
    run_recipe(main, "token_classification.py")
