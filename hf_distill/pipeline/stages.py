"""The stages of a classifier `hf-distill run`, in one ordered table; each reads earlier stages' folders and writes its
own (chat LMs: :mod:`hf_distill.pipeline.chat_stages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_distill.pipeline.context import RunContext
from hf_distill.pipeline.stage_keys import Stage, resume_point, stage_config, stage_infos
from hf_distill.tasks import Task


def _load(path: str | Path) -> Any:
    from hf_distill.loading import load_model

    model, _ = load_model(path, Task.SEQUENCE_CLASSIFICATION, with_tokenizer=False)
    return model


def teacher_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.metrics import evaluate_accuracy
    from hf_distill.teacher import finetune_teacher

    data, tokenizer = ctx.tokenized()
    t = ctx.config.teacher
    if t.finetune:
        print(f"  fine-tuning {t.model} on {len(data['train'])} examples ({t.epochs} epoch(s))")
        finetune_teacher(
            ctx.teacher_source(),
            data,
            tokenizer,
            ctx.workspace.teacher_dir,
            epochs=t.epochs,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            seed=ctx.config.seed,
            id2label=ctx.labels().id2label,
        )
    teacher = _load(ctx.teacher_path())
    return {
        "path": ctx.teacher_path(),
        "labels": ctx.labels().names,
        "accuracy": evaluate_accuracy(teacher, data["validation"], tokenizer),
        "parameters": sum(x.numel() for x in teacher.parameters()),
        "layers": teacher.config.num_hidden_layers,
    }


def student_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.student import create_student

    s = ctx.config.student
    widths = {"hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size}
    widths["num_attention_heads"] = s.num_attention_heads
    calibration = None
    if any(v is not None for v in widths.values()):  # width pruning ranks units on real training rows
        data, _ = ctx.tokenized()
        train = data["train"]
        calibration = train.select(range(min(s.calibration_size, len(train))))
    student = create_student(
        _load(ctx.teacher_path()),
        num_layers=None if s.layers else s.num_layers,
        layers=s.layers,
        calibration_data=calibration,
        **widths,
    )
    student.save_pretrained(ctx.workspace.cut_student_dir)
    ctx.tokenizer().save_pretrained(ctx.workspace.cut_student_dir)
    config = student.config
    return {
        "layers": config.hf_distill_teacher_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "parameters": sum(x.numel() for x in student.parameters()),
    }


def _distill(ctx: RunContext, name: str, alpha: float | None) -> dict[str, Any]:
    """Distil the cut student (``alpha=0``: labels only), resuming after a crash from the last checkpoint of the
    same stage config (``Workspace.training_checkpoints`` removes any other)."""
    from transformers import DataCollatorWithPadding

    from hf_distill.metrics import classification_metrics, evaluate_accuracy
    from hf_distill.trainer import DistillationTrainer

    data, tokenizer = ctx.tokenized()
    folder = ctx.workspace.distill_dir(name)
    checkpoints = ctx.workspace.training_checkpoints(folder, stage_config(ctx.config, "distill"))
    overrides = {"alpha": alpha} if alpha is not None else {}
    args = ctx.config.distillation_config(str(checkpoints), **overrides)
    train = data["train"]
    if "unlabelled" in data and args.alpha > 0:  # the labels-only baseline (alpha 0) learns from labels alone
        import datasets

        train = datasets.concatenate_datasets([train, data["unlabelled"]])
    trainer = DistillationTrainer(
        model=_load(ctx.workspace.cut_student_dir),
        teacher=_load(ctx.teacher_path()),
        args=args,
        train_dataset=train,
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
    )
    last = resume_point(checkpoints, name)
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(folder / "model"))
    return {
        "accuracy": evaluate_accuracy(trainer.model, data["validation"], tokenizer),
        "alpha": args.alpha,
        "train_rows": len(train),
        "unlabelled_rows": len(train) - len(data["train"]),
        "log_history": trainer.state.log_history,
        "resumed_from": last,
    }


def distill_stage(ctx: RunContext) -> dict[str, Any]:
    info = {"student": _distill(ctx, "student", None)}
    if ctx.config.student.baseline:
        info["baseline"] = _distill(ctx, "baseline", 0.0)
    d = ctx.config.distillation_config("unused")
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


def refine_stage(ctx: RunContext) -> dict[str, Any]:
    import copy

    from transformers import DataCollatorWithPadding

    from hf_distill.metrics import evaluate_accuracy
    from hf_distill.prompts import make_peft_student, prompt_refine_config
    from hf_distill.trainer import DistillationTrainer

    data, tokenizer = ctx.tokenized()
    r, ws = ctx.config.refine, ctx.workspace
    student = make_peft_student(
        copy.deepcopy(_load(ws.student_model_dir)),
        prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, r.num_virtual_tokens, method=r.method),
    )
    checkpoints = ws.training_checkpoints(ws.stage_dir("refine"), stage_config(ctx.config, "refine"))
    args = ctx.config.distillation_config(
        str(checkpoints),
        num_train_epochs=r.epochs,
        learning_rate=r.learning_rate,
        hidden_loss_weight=0.0,
        attention_loss_weight=0.0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=_load(ctx.teacher_path()),
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    last = resume_point(checkpoints, "refine")
    trainer.train(resume_from_checkpoint=last)
    student.save_pretrained(str(ws.refine_adapter_dir))
    tokenizer.save_pretrained(str(ws.refine_adapter_dir))
    return {
        "accuracy": evaluate_accuracy(student, data["validation"], tokenizer),
        "method": r.method,
        "log_history": trainer.state.log_history,
        "resumed_from": last,
    }


def export_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.export import export_onnx

    e, d, ws = ctx.config.export, ctx.config.data, ctx.workspace
    source = ws.refine_adapter_dir if ctx.config.refine.enabled else ws.student_model_dir
    report = export_onnx(
        source,
        ws.onnx_dir,
        variants=e.variants,
        validation_data=ctx.labelled_data()["validation"],
        text_column=d.text_column,
        label_column=d.label_column,
        num_validation=e.num_validation,
        max_length=e.max_length,
        max_metric_drop=e.max_metric_drop,
        fail_on_gate=not e.allow_failed,
        overwrite=True,
        engine=e.engine,
    )
    print(f"  exporter: {report['engine']} ({report['engine_reason']})")
    return {
        "source": str(source),
        "variants": report["variants"],
        "reference": report["reference"],
        **{k: report[k] for k in ("engine", "engine_reason", "kv_cache")},
    }


def bench_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.export import benchmark

    b, ws = ctx.config.bench, ctx.workspace
    result = benchmark(
        ws.onnx_dir,
        student=ws.student_model_dir,
        teacher=ctx.teacher_path() if b.include_teacher else None,
        teacher_metric=ws.info("teacher", stage_config(ctx.config, "teacher")).get("accuracy"),
        batch_sizes=b.batch_sizes,
        seq_lens=b.seq_lens,
        runs=b.runs,
        warmup=b.warmup,
        output_dir=ws.bench_dir,
    )
    return {"rows": result["rows"], "machine": result["machine"], "warnings": result["warnings"]}


def report_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.pipeline.report import write_report

    write_report(ctx.workspace, ctx.config, ctx.command, stage_infos(ctx.config, ctx.workspace))
    return {}


def push_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.pipeline.hub import build_upload_folder, push_folder

    infos = stage_infos(ctx.config, ctx.workspace)
    folder = build_upload_folder(ctx.workspace, ctx.config, ctx.command, infos, ctx.workspace.upload_dir)
    url = push_folder(folder, ctx.config.push.repo_id, private=ctx.config.push.private)
    return {"repo_id": ctx.config.push.repo_id, "url": url}


STAGES: tuple[Stage, ...] = (
    Stage("teacher", teacher_stage),
    Stage("student", student_stage),
    Stage("distill", distill_stage),
    Stage("refine", refine_stage, lambda c: c.refine.enabled),
    Stage("export", export_stage, lambda c: c.export.enabled),
    Stage("bench", bench_stage, lambda c: c.bench.enabled and c.export.enabled),
    Stage("report", report_stage, always_runs=True),
    Stage("push", push_stage, lambda c: c.push.enabled),
)
