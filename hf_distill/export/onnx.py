"""`export_onnx`: a saved (or in-memory) student -> an ONNX folder with every variant validated against PyTorch.

The folder holds everything inference needs: ``model*.onnx`` files, tokenizer files, ``config.json`` (with
``id2label``), ``hf_distill_manifest.json`` (inputs, variants, limits: what the torch-free edge runner reads) and
``export_report.json``. It is written to a temporary sibling folder and moved into place only when the export
succeeded, so a failed or interrupted export never leaves a half-written folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers import PreTrainedModel

from hf_distill.atomic import atomic_folder
from hf_distill.data import AUTO
from hf_distill.export.batches import EvalBatches, make_batches
from hf_distill.export.engine import ENGINES, GENAI, EngineChoice, choose_engine
from hf_distill.export.genai import check_quantization_options
from hf_distill.export.graph import export_graph, exporter_choice
from hf_distill.export.inputs import input_names_for, pad_id, tokenization_rule, write_tokenization_rule
from hf_distill.export.plan import ExportPlan, eval_mode, load_for_export
from hf_distill.export.validate import GateError, Reference, evaluate_torch, validate_variant, variant_table
from hf_distill.export.variants import INT8_LADDER, VARIANT_FILES, build_variant
from hf_distill.tasks import Task, infer_task

logger = logging.getLogger(__name__)
MANIFEST = "hf_distill_manifest.json"
REPORT = "export_report.json"
DEFAULT_VARIANTS = ("fp32", "fp32_optimized", "int8_dynamic")


def export_onnx(
    model_or_dir: PreTrainedModel | nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    variants: Sequence[str] | None = None,
    validation_data: Any = None,
    calibration_data: Any = None,
    tokenizer: Any = None,
    text_column: str | None = None,
    label_column: str = "label",
    text_pair_column: str | None = AUTO,
    num_validation: int = 256,
    num_calibration: int = 64,
    max_length: int = 128,
    batch_size: int = 32,
    max_metric_drop: float | None = None,
    fail_on_gate: bool = True,
    overwrite: bool = False,
    opset: int = 18,
    prompt_mode: str = "baked",
    engine: str = "auto",
    min_greedy_agreement: float = 0.8,
    num_prompts: int = 8,
    block_size: int = 32,
    accuracy_level: int = 4,
) -> dict[str, Any]:
    """Export a student to ONNX variants, validate each on real data, and write the folder atomically.

    ``engine`` picks the exporter (:func:`hf_distill.export.engine.choose_engine`, recorded in the report as
    ``engine``, ``engine_reason``, ``kv_cache``): with ``"auto"`` a decoder LM whose architecture onnxruntime-genai's
    model builder supports goes through :func:`~hf_distill.export.llm.export_llm` (KV cache; variants ``fp32``,
    ``int8``, ``int4``, default ``["int4"]``; gate: perplexity at most ``max_metric_drop`` percent above PyTorch's,
    default 5, and ``min_greedy_agreement``; int4 options ``block_size``, ``accuracy_level``; ``num_prompts`` greedy
    prompts), and everything else (classifiers, other decoder LMs, prompt-tuned decoder LMs) through torch.onnx as
    below, a causal LM then without a KV cache (logged with the reason). ``"torch"`` forces torch.onnx, ``"genai"``
    requires onnxruntime-genai.

    torch.onnx path: ``validation_data`` (and ``calibration_data`` for ``int8_static``; default: the validation data)
    is a ``datasets.Dataset`` with raw text (``text_column``, default ``"sentence"``, ``"text"`` for causal LMs, whose
    chat rows — ``messages`` or ``prompt``/``response`` — are also read through the chat template; ``label_column``;
    sentence pairs: ``text_pair_column``, "auto" finds GLUE's pair names, see :func:`hf_distill.data.text_columns`)
    or tokenized ``input_ids`` (+
    ``token_type_ids``, ``labels``). Each variant (default ``fp32``, ``fp32_optimized``, ``int8_dynamic``) is compared
    with the trained model's task metric in PyTorch: a drop above ``max_metric_drop`` (default 1) points (accuracy,
    regression R²) or percent (perplexity), or any NaN/inf output, fails it; ``int8_dynamic`` climbs a fallback
    ladder first. A failed gate raises :class:`GateError` unless ``fail_on_gate=False`` (then the report marks it
    ``passed: false`` with a ``reason``). LoRA-style adapters are merged into a copy (the caller's model is not
    changed). Prompt-tuned / p-tuned PEFT students export with their learned prompt ``prompt_mode="baked"`` into the
    graph, or as its input ``prompt_embeds`` (``"input"``: one backbone serves every task prompt; the prompt is saved
    under ``prompts/``). Inputs are truncated to ``min(max_length, positions the model can use)``. Returns the report
    (also written as ``export_report.json``).

    Raises:
        ValueError: bad arguments or data, a model that gives NaN/inf in PyTorch, an adapter that does not merge
            faithfully — all before anything is written. :class:`GateError` (a ValueError) for a failed gate.
    """
    output_dir = Path(output_dir)
    _check_arguments(output_dir, overwrite, prompt_mode, engine)
    check_quantization_options(block_size, accuracy_level)
    loaded, folder_tokenizer = load_for_export(model_or_dir)
    choice = choose_engine(loaded, engine)
    if text_column is None:  # the datasets' usual names: GLUE's "sentence", a language-model corpus's "text"
        text_column = "text" if infer_task(loaded) is Task.CAUSAL_LM else "sentence"
    if choice.engine == GENAI:
        # A folder is loaded again by export_llm (its own copy to merge into), so this one is freed.
        source = model_or_dir if isinstance(model_or_dir, (str, os.PathLike)) else loaded
        del loaded
        llm_options = dict(
            text_column=text_column,
            num_validation=num_validation,
            max_length=max_length,
            max_ppl_increase=5.0 if max_metric_drop is None else max_metric_drop,
            min_greedy_agreement=min_greedy_agreement,
            num_prompts=num_prompts,
            block_size=block_size,
            accuracy_level=accuracy_level,
            fail_on_gate=fail_on_gate,
            overwrite=overwrite,
        )
        return _export_genai(source, output_dir, variants, validation_data, tokenizer or folder_tokenizer, llm_options)
    _log_fallback(choice)
    variants = DEFAULT_VARIANTS if variants is None else variants
    _check_variants(variants)
    max_metric_drop = 1.0 if max_metric_drop is None else max_metric_drop
    with eval_mode(loaded):
        plan = ExportPlan.create(loaded, tokenizer or folder_tokenizer, prompt_mode, max_length)
        if "int4" in variants and plan.task is not Task.CAUSAL_LM:
            raise ValueError("int4 weight-only quantization (MatMulNBits) targets decoder LMs; for encoders use int8.")
        options = {
            "text_column": text_column,
            "label_column": label_column,
            "text_pair_column": text_pair_column,
            "max_length": plan.max_length,
            "batch_size": batch_size,
        }
        batches = _batches(plan, validation_data, num_validation, options)
        calibration = batches
        if "int8_static" in variants and calibration_data is not None:
            calibration = _batches(plan, calibration_data, num_calibration, options)
        reference = evaluate_torch(plan.reference, batches, plan.task, virtual_tokens=plan.virtual_tokens)
        plan.merge(batches, reference, in_place=isinstance(model_or_dir, (str, os.PathLike)))
        gate = _Gate(batches, calibration, reference, num_calibration, max_metric_drop)
        report = _write_atomically(output_dir, plan, variants, gate, opset, fail_on_gate, choice)
    logger.info("Exported %s to %s", [r["variant"] for r in report["variants"]], output_dir)
    return report


def _export_genai(
    source: Any,
    output_dir: Path,
    variants: Sequence[str] | None,
    validation_data: Any,
    tokenizer: Any,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The decoder-LM path: onnxruntime-genai variants with a KV cache (``export_llm``)."""
    from hf_distill.export.genai import GENAI_VARIANTS
    from hf_distill.export.llm import export_llm

    variants = ("int4",) if variants is None else variants
    unknown = [v for v in variants if v not in GENAI_VARIANTS]
    if unknown or not variants:
        raise ValueError(
            f"Variants {unknown or list(variants)} are not decoder-LM variants; with a KV cache (onnxruntime-genai) "
            f"choose from {list(GENAI_VARIANTS)}, or pass engine='torch' (--engine torch) for the no-cache "
            f"variants {sorted(VARIANT_FILES)}."
        )
    return export_llm(
        source, output_dir, variants=variants, validation_data=validation_data, tokenizer=tokenizer, **options
    )


def _log_fallback(choice: EngineChoice) -> None:
    """A decoder LM exported without a KV cache costs the square of the sequence length per answer: say so."""
    if not choice.causal_lm:
        logger.info("Exporter %s: %s", choice.engine, choice.reason)
        return
    logger.warning(
        "%s: exporting without a KV cache through %s (every new token re-reads the whole sequence): %s",
        choice.architecture,
        choice.engine,
        choice.reason,
    )


def _batches(plan: ExportPlan, data: Any, limit: int, options: dict[str, Any]) -> EvalBatches:
    return plan.with_prompt(make_batches(data, plan.tokenizer, plan.model, plan.task, limit=limit, **options))


def _check_arguments(output_dir: Path, overwrite: bool, prompt_mode: str, engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"Unknown export engine {engine!r}; choose from {list(ENGINES)}.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{str(output_dir)!r} exists and is not empty; pass overwrite=True (--force) or another "
            "folder. Nothing was written."
        )
    if prompt_mode not in ("baked", "input"):
        raise ValueError(f"prompt_mode must be 'baked' or 'input', got {prompt_mode!r}.")
    exporter_choice()  # a bad $HF_DISTILL_ONNX_EXPORTER fails here, before any model is loaded


def _check_variants(variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in VARIANT_FILES]
    if unknown or not variants:
        raise ValueError(f"Unknown variants {unknown or variants}; choose from {sorted(VARIANT_FILES)}.")


@dataclass
class _Gate:
    """The accuracy gate's inputs: validation and calibration batches, the PyTorch reference, the allowed drop."""

    batches: EvalBatches
    calibration: EvalBatches
    reference: Reference
    num_calibration: int
    max_metric_drop: float


def _write_atomically(
    output_dir: Path,
    plan: ExportPlan,
    variants: Sequence[str],
    gate: _Gate,
    opset: int,
    fail_on_gate: bool,
    choice: EngineChoice,
) -> dict[str, Any]:
    """Export into a temporary sibling folder and move it into place only when the gate allows."""
    with atomic_folder(output_dir) as staging:
        report = _export_into(staging, plan, variants, gate, opset, choice)
        failed = [row["variant"] for row in report["variants"] if not row["passed"]]
        if failed and fail_on_gate:
            raise GateError(failed, report)
    return report


def _export_into(
    folder: Path, plan: ExportPlan, variants: Sequence[str], gate: _Gate, opset: int, choice: EngineChoice
) -> dict[str, Any]:
    """Write the fp32 graph, every variant (validated), the tokenizer, prompt, manifest and report into ``folder``."""
    base = str(folder / VARIANT_FILES["fp32"])
    exporter = export_graph(plan.model, base, opset, plan.prompt, plan.prompt_as_input)
    rule = _save_preprocessing(folder, plan)
    rows = [{**_build_and_validate(variant, base, folder, plan, gate), "exporter": exporter} for variant in variants]
    if "fp32" not in variants:
        os.remove(base)
    report = {
        "task": plan.task.value,
        "exporter": exporter,
        **choice.as_dict(),
        "reference": gate.reference.as_dict(),
        "max_metric_drop": gate.max_metric_drop,
        "num_validation_examples": gate.batches.num_examples,
        "text_columns": gate.batches.text_columns,
        "variants": rows,
    }
    manifest = _manifest(folder, plan, rows, rule, gate.batches)
    manifest.update(exporter=exporter, opset=opset, prompt=_save_prompt(folder, plan), **choice.as_dict())
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (folder / REPORT).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _build_and_validate(variant: str, base: str, folder: Path, plan: ExportPlan, gate: _Gate) -> dict[str, Any]:
    """Build ``variant`` (climbing the int8 ladder until a rung passes) and return its validated report row."""
    attempts = []
    for rung in INT8_LADDER if variant == "int8_dynamic" else (None,):
        built = build_variant(variant, base, folder, plan.model, gate.calibration, gate.num_calibration, rung)
        row = validate_variant(built, folder, gate.batches, gate.reference, plan.task, gate.max_metric_drop)
        attempts.append({"settings": built.settings, "metric_drop": row["metric_drop"], "passed": row["passed"]})
        if row["passed"]:
            break
    logger.info("%s", variant_table([row], row["metric"]).splitlines()[-1])
    return {**row, "attempts": attempts}


def _save_preprocessing(folder: Path, plan: ExportPlan) -> dict[str, Any] | None:
    """config.json and the tokenizer, whose tokenizer.json gets the export's padding/truncation rule."""
    plan.model.config.save_pretrained(folder)
    if plan.tokenizer is None:
        return None
    plan.tokenizer.save_pretrained(folder)
    rule = tokenization_rule(plan.tokenizer, plan.model.config, plan.max_length)
    if (folder / "tokenizer.json").is_file():
        write_tokenization_rule(folder / "tokenizer.json", rule)
    return rule


def _save_prompt(folder: Path, plan: ExportPlan) -> dict[str, Any] | None:
    """The manifest's prompt section; a prompt-as-input export also gets its prompt as ``prompts/<adapter>.npy``."""
    if plan.prompt is None:
        return None
    info = {
        "mode": "input" if plan.prompt_as_input else "baked",
        "num_virtual_tokens": plan.virtual_tokens,
        "adapter": plan.adapter,
    }
    if plan.prompt_as_input:
        (folder / "prompts").mkdir()
        np.save(folder / "prompts" / f"{plan.adapter}.npy", plan.prompt.numpy())
        info["default_file"] = f"prompts/{plan.adapter}.npy"
    return info


def _manifest(
    folder: Path, plan: ExportPlan, rows: list[dict[str, Any]], rule: dict[str, Any] | None, batches: EvalBatches
) -> dict[str, Any]:
    """What the torch-free edge runner reads: inputs, variants, limits, the tokenizer rule, labels."""
    classifier = plan.task is Task.SEQUENCE_CLASSIFICATION
    id2label = plan.model.config.id2label or {}
    return {
        "format": "hf_distill-onnx/1",
        "task": plan.task.value,
        "problem_type": ("regression" if plan.regression else "single_label_classification") if classifier else None,
        "inputs": input_names_for(plan.model, plan.prompt_as_input),
        "outputs": ["logits"],
        "variants": {r["variant"]: r["file"] for r in rows if r["passed"]},
        "default_variant": _default_variant(rows),
        "max_length": int(plan.max_length),
        "max_positions": int(plan.max_positions),
        "tokenization": rule,
        "text_columns": batches.text_columns,
        "id2label": {str(k): v for k, v in id2label.items()}
        if plan.task is not Task.CAUSAL_LM and not plan.regression
        else {},
        "pad_token_id": pad_id(plan.tokenizer, plan.model.config),
        "eos_token_id": getattr(plan.model.config, "eos_token_id", None),
        "tokenizer": "tokenizer.json" if (folder / "tokenizer.json").is_file() else None,
    }


def _default_variant(rows: list[dict[str, Any]]) -> str | None:
    for preferred in ("int8_dynamic", "int8_static", "fp32_optimized", "fp32"):
        if any(r["variant"] == preferred and r["passed"] for r in rows):
            return preferred
    return None
