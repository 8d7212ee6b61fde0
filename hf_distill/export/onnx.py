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
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from hf_distill.export.graph import export_graph
from hf_distill.export.inputs import input_names_for, pad_id, usable_positions
from hf_distill.export.validate import (
    EvalBatches,
    GateError,
    evaluate_torch,
    make_batches,
    validate_variant,
)
from hf_distill.export.variants import INT8_LADDER, VARIANT_FILES, build_variant
from hf_distill.loading import load_model
from hf_distill.prompts import check_peft_combination, prompt_embeddings
from hf_distill.tasks import Task, infer_task

logger = logging.getLogger(__name__)
MANIFEST = "hf_distill_manifest.json"
REPORT = "export_report.json"
DEFAULT_VARIANTS = ("fp32", "fp32_optimized", "int8_dynamic")


def load_for_export(model_or_dir: PreTrainedModel | nn.Module | str | os.PathLike) -> tuple[PreTrainedModel, Any]:
    """The model (PEFT LoRA merged) and, for a folder, its tokenizer. Prompt-learning PEFT models stay wrapped."""
    tokenizer = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, tokenizer = load_model(model_or_dir, purpose="export")
    else:
        model = model_or_dir
    config = getattr(model, "active_peft_config", None)
    if config is not None and not config.is_prompt_learning:
        model = model.merge_and_unload()  # LoRA & co: fold the adapter into the weights
    elif config is not None:
        check_peft_combination(model)
        if type(config).__name__ == "PrefixTuningConfig":
            raise ValueError(
                "Prefix tuning lives in the attention cache, which the exported graph does not take; "
                "export prompt-tuned, p-tuned or LoRA students."
            )
        return model.eval(), tokenizer
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"export_onnx needs a transformers PreTrainedModel or its folder, got {type(model).__name__}.")
    return model.eval(), tokenizer


def export_onnx(
    model_or_dir: PreTrainedModel | nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    validation_data: Any = None,
    calibration_data: Any = None,
    tokenizer: Any = None,
    text_column: str = "sentence",
    label_column: str = "label",
    num_validation: int = 256,
    num_calibration: int = 64,
    max_length: int = 128,
    batch_size: int = 32,
    max_metric_drop: float = 1.0,
    fail_on_gate: bool = True,
    overwrite: bool = False,
    opset: int = 18,
    prompt_mode: str = "baked",
) -> dict[str, Any]:
    """Export a student to ONNX variants, validate each on real data, and write the folder atomically.

    ``validation_data`` (and ``calibration_data`` for ``int8_static``; default: the validation data) is a
    ``datasets.Dataset`` with raw text (``text_column``, ``label_column``) or tokenized ``input_ids`` (+ ``labels``).
    Each variant's task metric is compared with PyTorch's: a drop above ``max_metric_drop`` points (accuracy) or
    percent (perplexity) fails it; ``int8_dynamic`` climbs a fallback ladder first. A failed gate raises
    :class:`GateError` unless ``fail_on_gate=False`` (then the report marks it ``passed: false``).
    Prompt-tuned / p-tuned PEFT students export with their learned prompt ``prompt_mode="baked"`` into the graph, or
    as its input ``prompt_embeds`` (``"input"``: one backbone serves every task prompt; the prompt is saved under
    ``prompts/``). Returns the report (also written as ``export_report.json``).
    """
    unknown = [v for v in variants if v not in VARIANT_FILES]
    if unknown or not variants:
        raise ValueError(f"Unknown variants {unknown or variants}; choose from {sorted(VARIANT_FILES)}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{str(output_dir)!r} exists and is not empty; pass overwrite=True (--force) or another "
            "folder. Nothing was written."
        )
    if prompt_mode not in ("baked", "input"):
        raise ValueError(f"prompt_mode must be 'baked' or 'input', got {prompt_mode!r}.")
    loaded, folder_tokenizer = load_for_export(model_or_dir)
    plan = ExportPlan.create(loaded, tokenizer or folder_tokenizer, prompt_mode, max_length)
    if "int4" in variants and plan.task is not Task.CAUSAL_LM:
        raise ValueError("int4 weight-only quantization (MatMulNBits) targets decoder LMs; for encoders use int8.")
    # Data problems surface before any export work.
    options = {
        "text_column": text_column,
        "label_column": label_column,
        "max_length": plan.max_length,
        "batch_size": batch_size,
    }
    batches = plan.with_prompt(
        make_batches(validation_data, plan.tokenizer, plan.model, plan.task, limit=num_validation, **options)
    )
    calibration = batches
    if "int8_static" in variants and calibration_data is not None:
        calibration = plan.with_prompt(
            make_batches(calibration_data, plan.tokenizer, plan.model, plan.task, limit=num_calibration, **options)
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        report = _export_into(staging, plan, variants, batches, calibration, num_calibration, max_metric_drop, opset)
        failed = [row["variant"] for row in report["variants"] if not row["passed"]]
        if failed and fail_on_gate:
            raise GateError(failed, report)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Exported %s to %s", [r["variant"] for r in report["variants"]], output_dir)
    return report


@dataclass
class ExportPlan:
    """What gets exported: the transformers model, its reference (a PEFT model, if any) and its soft prompt."""

    model: PreTrainedModel  # the graph's backbone
    reference: nn.Module  # the model whose outputs the export must reproduce
    tokenizer: Any
    task: Task
    max_length: int  # longest input, after the virtual tokens' share of the positions
    prompt: torch.Tensor | None = None
    prompt_as_input: bool = False
    adapter: str = "default"

    @classmethod
    def create(cls, loaded: nn.Module, tokenizer: Any, prompt_mode: str, max_length: int) -> ExportPlan:
        task = infer_task(loaded)
        if getattr(loaded, "active_peft_config", None) is None:
            return cls(loaded, loaded, tokenizer, task, min(max_length, usable_positions(loaded.config, max_length)))
        prompt = prompt_embeddings(loaded).float().cpu()
        base = loaded.base_model
        budget = usable_positions(base.config, 10**9) - prompt.shape[0]
        if budget < 1:
            raise ValueError(f"The prompt's {prompt.shape[0]} virtual tokens leave no room for input positions.")
        return cls(
            base,
            loaded,
            tokenizer,
            task,
            min(max_length, budget),
            prompt,
            prompt_mode == "input",
            loaded.active_adapter,
        )

    def with_prompt(self, batches: EvalBatches) -> EvalBatches:
        if self.prompt_as_input:
            for feed in batches.inputs:
                feed["prompt_embeds"] = self.prompt.numpy()
        return batches


def _export_into(
    folder: Path,
    plan: ExportPlan,
    variants: Sequence[str],
    batches: EvalBatches,
    calibration: EvalBatches,
    num_calibration: int,
    max_metric_drop: float,
    opset: int,
) -> dict[str, Any]:
    virtual = 0 if plan.prompt is None else plan.prompt.shape[0]
    reference = evaluate_torch(plan.reference, batches, plan.task, virtual_tokens=virtual)
    base = str(folder / VARIANT_FILES["fp32"])
    exporter = export_graph(plan.model, base, opset, plan.prompt, plan.prompt_as_input)
    plan.model.config.save_pretrained(folder)
    if plan.tokenizer is not None:
        plan.tokenizer.save_pretrained(folder)
    rows = []
    for variant in variants:
        attempts = []
        for rung in INT8_LADDER if variant == "int8_dynamic" else (None,):
            built = build_variant(variant, base, folder, plan.model, calibration, num_calibration, rung)
            row = validate_variant(built, folder, batches, reference, plan.task, max_metric_drop)
            attempts.append({"settings": built.settings, "metric_drop": row["metric_drop"], "passed": row["passed"]})
            if row["passed"]:
                break
        rows.append({**row, "exporter": exporter, "attempts": attempts})
        logger.info(
            "%s: %s=%.4f (drop %.2f) max|Δ|=%.2e -> %s",
            variant,
            row["metric"],
            row["metric_value"],
            row["metric_drop"],
            row["max_abs_diff"],
            "pass" if row["passed"] else "FAIL",
        )
    if "fp32" not in variants:
        os.remove(base)
    prompt_info = None
    if plan.prompt is not None:
        prompt_info = {
            "mode": "input" if plan.prompt_as_input else "baked",
            "num_virtual_tokens": virtual,
            "adapter": plan.adapter,
        }
        if plan.prompt_as_input:
            (folder / "prompts").mkdir()
            np.save(folder / "prompts" / f"{plan.adapter}.npy", plan.prompt.numpy())
            prompt_info["default_file"] = f"prompts/{plan.adapter}.npy"
    report = {
        "task": plan.task.value,
        "exporter": exporter,
        "reference": reference.as_dict(),
        "max_metric_drop": max_metric_drop,
        "num_validation_examples": batches.num_examples,
        "variants": rows,
    }
    id2label = plan.model.config.id2label or {}
    manifest = {
        "format": "hf_distill-onnx/1",
        "task": plan.task.value,
        "inputs": input_names_for(plan.model, plan.prompt_as_input),
        "outputs": ["logits"],
        "variants": {r["variant"]: r["file"] for r in rows if r["passed"]},
        "default_variant": _default_variant(rows),
        "max_length": int(plan.max_length),
        "prompt": prompt_info,
        "id2label": {str(k): v for k, v in id2label.items()} if plan.task is not Task.CAUSAL_LM else {},
        "pad_token_id": pad_id(plan.tokenizer, plan.model.config),
        "eos_token_id": getattr(plan.model.config, "eos_token_id", None),
        "tokenizer": "tokenizer.json" if (folder / "tokenizer.json").is_file() else None,
        "exporter": exporter,
        "opset": opset,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (folder / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _default_variant(rows: list[dict[str, Any]]) -> str | None:
    for preferred in ("int8_dynamic", "int8_static", "fp32_optimized", "fp32"):
        if any(r["variant"] == preferred and r["passed"] for r in rows):
            return preferred
    return None
