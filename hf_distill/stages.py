"""The stages of `hf-distill run`, each reading earlier stages' folders and writing its own (see pipeline.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hf_distill.pipeline import Pipeline


def _accuracy(model: Any, dataset: Any, tokenizer: Any, batch_size: int = 64) -> float:
    """Dev accuracy in %, with the model as it is (no Trainer: a plain, fast evaluation loop)."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    columns = ["input_ids", "attention_mask", "token_type_ids", "labels"]
    rows = dataset.remove_columns([c for c in dataset.column_names if c not in columns])
    correct = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / max(len(rows), 1)


def _load(path: str | Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)


def teacher_path(p: Pipeline) -> str:
    return str(p.root / "teacher") if p.config.teacher.finetune else p.teacher_source()


def teacher_stage(p: Pipeline) -> dict[str, Any]:
    from hf_distill.pipeline import finetune_teacher

    data, tokenizer = p.tokenized()
    t = p.config.teacher
    if t.finetune:
        print(f"  fine-tuning {t.model} on {len(data['train'])} examples ({t.epochs} epoch(s))")
        finetune_teacher(
            p.teacher_source(),
            data,
            tokenizer,
            p.root / "teacher",
            epochs=t.epochs,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            seed=p.config.seed,
        )
    teacher = _load(teacher_path(p))
    return {
        "path": teacher_path(p),
        "accuracy": _accuracy(teacher, data["validation"], tokenizer),
        "parameters": sum(x.numel() for x in teacher.parameters()),
        "layers": teacher.config.num_hidden_layers,
    }


def student_stage(p: Pipeline) -> dict[str, Any]:
    from hf_distill.student import create_student

    _, tokenizer = p.tokenized()
    s = p.config.student
    teacher = _load(teacher_path(p))
    student = create_student(teacher, num_layers=None if s.layers else s.num_layers, layers=s.layers)
    student.save_pretrained(p.root / "student")
    tokenizer.save_pretrained(p.root / "student")
    return {
        "layers": student.config.hf_distill_teacher_layers,
        "parameters": sum(x.numel() for x in student.parameters()),
    }


def _distill(p: Pipeline, name: str, alpha: float | None) -> dict[str, Any]:
    """Distil the cut student (``alpha=0``: labels only), resuming from the last checkpoint after a crash."""
    from transformers import DataCollatorWithPadding

    from hf_distill.metrics import classification_metrics
    from hf_distill.trainer import DistillationTrainer, last_complete_checkpoint

    data, tokenizer = p.tokenized()
    folder = p.root / "distill" / name
    overrides = {"alpha": alpha} if alpha is not None else {}
    args = p.config.distillation_config(str(folder / "checkpoints"), **overrides)
    trainer = DistillationTrainer(
        model=_load(p.root / "student"),
        teacher=_load(teacher_path(p)),
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
    )
    last = last_complete_checkpoint(folder / "checkpoints")
    if last:
        print(f"  resuming {name} from {last}")
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(folder / "model"))
    return {
        "accuracy": _accuracy(trainer.model, data["validation"], tokenizer),
        "alpha": args.alpha,
        "log_history": trainer.state.log_history,
        "resumed_from": last,
    }


def distill_stage(p: Pipeline) -> dict[str, Any]:
    info = {"student": _distill(p, "student", None)}
    if p.config.student.baseline:
        info["baseline"] = _distill(p, "baseline", 0.0)
    d = p.config.distillation_config("unused")
    info["settings"] = {
        "alpha": d.alpha,
        "temperature": d.temperature,
        "kd_loss": d.kd_loss,
        "hidden_loss_weight": d.hidden_loss_weight,
        "attention_loss_weight": d.attention_loss_weight,
        "epochs": d.num_train_epochs,
        "learning_rate": d.learning_rate,
    }
    return info


def student_model_dir(p: Pipeline) -> Path:
    return p.root / "distill" / "student" / "model"


def refine_stage(p: Pipeline) -> dict[str, Any]:
    import copy

    from transformers import DataCollatorWithPadding

    from hf_distill.prompts import make_peft_student, prompt_refine_config
    from hf_distill.tasks import Task
    from hf_distill.trainer import DistillationTrainer

    data, tokenizer = p.tokenized()
    r = p.config.refine
    student = make_peft_student(
        copy.deepcopy(_load(student_model_dir(p))),
        prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, r.num_virtual_tokens, method=r.method),
    )
    args = p.config.distillation_config(
        str(p.root / "refine" / "checkpoints"),
        num_train_epochs=r.epochs,
        learning_rate=r.learning_rate,
        hidden_loss_weight=0.0,
        attention_loss_weight=0.0,
    )
    DistillationTrainer(
        model=student,
        teacher=_load(teacher_path(p)),
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    ).train()
    student.save_pretrained(str(p.root / "refine" / "adapter"))
    tokenizer.save_pretrained(str(p.root / "refine" / "adapter"))
    return {"accuracy": _accuracy(student, data["validation"], tokenizer), "method": r.method}


def export_stage(p: Pipeline) -> dict[str, Any]:
    from hf_distill.onnx_export import export_onnx

    e, d = p.config.export, p.config.data
    source = p.root / "refine" / "adapter" if p.config.refine.enabled else student_model_dir(p)
    report = export_onnx(
        source,
        p.root / "export" / "onnx",
        variants=e.variants,
        validation_data=p.raw_data()["validation"],
        text_column=d.text_column,
        label_column=d.label_column,
        num_validation=e.num_validation,
        max_length=e.max_length,
        max_metric_drop=e.max_metric_drop,
        overwrite=True,
    )
    return {"source": str(source), "variants": report["variants"], "reference": report["reference"]}


def bench_stage(p: Pipeline) -> dict[str, Any]:
    from hf_distill.bench import benchmark

    b = p.config.bench
    teacher_info = p.info("teacher")
    result = benchmark(
        p.root / "export" / "onnx",
        student=student_model_dir(p),
        teacher=teacher_path(p) if b.include_teacher else None,
        teacher_metric=teacher_info.get("accuracy"),
        batch_sizes=b.batch_sizes,
        seq_lens=b.seq_lens,
        runs=b.runs,
        warmup=b.warmup,
        output_dir=p.root / "bench",
    )
    return {"rows": result["rows"], "machine": result["machine"], "warnings": result["warnings"]}


def report_stage(p: Pipeline) -> dict[str, Any]:
    from hf_distill.report import write_report

    write_report(p)
    return {}


def push_stage(p: Pipeline) -> dict[str, Any]:
    from hf_distill.report import build_upload_folder, push_folder

    folder = build_upload_folder(p, p.root / "push" / "upload")
    url = push_folder(folder, p.config.push.repo_id, private=p.config.push.private)
    return {"repo_id": p.config.push.repo_id, "url": url}
