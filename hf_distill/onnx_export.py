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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from hf_distill.onnx_validate import (
    EvalBatches,
    GateError,
    evaluate_torch,
    make_batches,
    uses_token_types,
    validate_variant,
)
from hf_distill.onnx_variants import INT8_LADDER, VARIANT_FILES, build_variant
from hf_distill.tasks import AUTO_CLASSES, Task, infer_task

logger = logging.getLogger(__name__)
MANIFEST = "hf_distill_manifest.json"
REPORT = "export_report.json"
DEFAULT_VARIANTS = ("fp32", "fp32_optimized", "int8_dynamic")
_TWO_GB = 2 * 1024**3


def load_for_export(model_or_dir: PreTrainedModel | nn.Module | str | os.PathLike) -> tuple[PreTrainedModel, Any]:
    """The model (PEFT LoRA merged) and, for a folder, its tokenizer."""
    tokenizer = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"No saved model in {str(folder)!r} (config.json missing). Pass the folder written by "
                "trainer.save_model() / save_pretrained(), or the model object itself."
            )
        config = AutoConfig.from_pretrained(folder)
        architecture = (config.architectures or ["?"])[0]
        task = next((t for t in Task if architecture.endswith(_SUFFIX[t])), None)
        if task is None:
            raise ValueError(
                f"Cannot export {architecture}: supported are *ForSequenceClassification, "
                "*ForTokenClassification and *ForCausalLM models."
            )
        model = AUTO_CLASSES[task].from_pretrained(folder, use_safetensors=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    else:
        model = model_or_dir
    peft_type = getattr(getattr(model, "peft_config", {}).get("default"), "peft_type", None)
    if peft_type is not None:
        if str(getattr(peft_type, "value", peft_type)) != "LORA":
            raise ValueError(
                f"Exporting a {peft_type} PEFT model needs its virtual prompt in the graph: use "
                "hf_distill's prompt export (the PEFT issue), or merge the adapter first."
            )
        model = model.merge_and_unload()
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"export_onnx needs a transformers PreTrainedModel or its folder, got {type(model).__name__}.")
    return model.eval(), tokenizer


_SUFFIX = {
    Task.SEQUENCE_CLASSIFICATION: "ForSequenceClassification",
    Task.TOKEN_CLASSIFICATION: "ForTokenClassification",
    Task.CAUSAL_LM: "ForCausalLM",
}


class _LogitsOnly(nn.Module):
    """Export wrapper: named tensor inputs in, logits out (no KV cache, no dict outputs)."""

    def __init__(self, model: PreTrainedModel, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, list(input_names)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if infer_task(self.model) is Task.CAUSAL_LM:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def input_names_for(model: PreTrainedModel) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(model) else [])


def export_graph(model: PreTrainedModel, path: str, opset: int = 18) -> str:
    """Write ``model`` as ONNX with dynamic batch and sequence axes; returns the exporter that succeeded.

    Tries the dynamo exporter (torch.export) first and falls back to the TorchScript exporter when it fails.
    Eager attention is used for export: its graph is what onnxruntime's transformer fusions recognise.
    """
    previous = getattr(model.config, "_attn_implementation", "eager")
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        return _export_graph(model, path, opset)
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


def _export_graph(model: PreTrainedModel, path: str, opset: int) -> str:
    names = input_names_for(model)
    sample = {
        "input_ids": torch.full((2, 8), 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 8, dtype=torch.long),
    }
    args = tuple(sample[n] for n in names)
    wrapper = _LogitsOnly(model, names).eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _TWO_GB * 0.9
    logits_axes = {0: "batch"} if infer_task(model) is Task.SEQUENCE_CLASSIFICATION else {0: "batch", 1: "sequence"}
    try:
        max_positions = int(getattr(model.config, "max_position_embeddings", None) or 8192)
        batch = torch.export.Dim("batch", min=1, max=4096)
        seq = torch.export.Dim("sequence", min=1, max=max_positions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                path,
                dynamo=True,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                opset_version=opset,
                external_data=big,
                optimize=True,
                verbose=False,
            )
        return "dynamo"
    except Exception as err:  # the fallback exists for whatever torch.export cannot trace
        logger.warning(
            "Dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter.",
            type(err).__name__,
            str(err).splitlines()[0][:300],
        )
    for leftover in Path(path).parent.glob(Path(path).name + "*"):
        leftover.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            path,
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": logits_axes},
            opset_version=min(opset, 17),
        )
    if big:
        import onnx

        onnx.save(onnx.load(path), path, save_as_external_data=True, location=Path(path).name + ".data")
    return "torchscript"


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
) -> dict[str, Any]:
    """Export a student to ONNX variants, validate each on real data, and write the folder atomically.

    ``validation_data`` (and ``calibration_data`` for ``int8_static``; default: the validation data) is a
    ``datasets.Dataset`` with raw text (``text_column``, ``label_column``) or tokenized ``input_ids`` (+ ``labels``).
    Each variant's task metric is compared with PyTorch's: a drop above ``max_metric_drop`` points (accuracy) or
    percent (perplexity) fails it; ``int8_dynamic`` climbs a fallback ladder first. A failed gate raises
    :class:`GateError` unless ``fail_on_gate=False`` (then the report marks it ``passed: false``).
    Returns the report (also written as ``export_report.json``).
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
    model, folder_tokenizer = load_for_export(model_or_dir)
    tokenizer = tokenizer or folder_tokenizer
    task = infer_task(model)
    if "int4" in variants and task is not Task.CAUSAL_LM:
        raise ValueError("int4 weight-only quantization (MatMulNBits) targets decoder LMs; for encoders use int8.")
    # Data problems surface before any export work.
    batches = make_batches(
        validation_data,
        tokenizer,
        model,
        task,
        text_column=text_column,
        label_column=label_column,
        limit=num_validation,
        max_length=max_length,
        batch_size=batch_size,
    )
    calibration = batches
    if "int8_static" in variants and calibration_data is not None:
        calibration = make_batches(
            calibration_data,
            tokenizer,
            model,
            task,
            text_column=text_column,
            label_column=label_column,
            limit=num_calibration,
            max_length=max_length,
            batch_size=batch_size,
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        report = _export_into(
            staging,
            model,
            tokenizer,
            task,
            variants,
            batches,
            calibration,
            num_calibration,
            max_metric_drop,
            opset,
            max_length,
        )
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


def _export_into(
    folder: Path,
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    variants: Sequence[str],
    batches: EvalBatches,
    calibration: EvalBatches,
    num_calibration: int,
    max_metric_drop: float,
    opset: int,
    max_length: int,
) -> dict[str, Any]:
    reference = evaluate_torch(model, batches, task)
    base = str(folder / VARIANT_FILES["fp32"])
    exporter = export_graph(model, base, opset)
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    rows = []
    for variant in variants:
        attempts = []
        for rung in INT8_LADDER if variant == "int8_dynamic" else (None,):
            built = build_variant(variant, base, folder, model, calibration, num_calibration, rung)
            row = validate_variant(built, folder, batches, reference, task, max_metric_drop)
            attempts.append({"settings": built.settings, "metric_drop": row["metric_drop"], "passed": row["passed"]})
            if row["passed"]:
                break
        row["exporter"] = exporter
        row["attempts"] = attempts
        rows.append(row)
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
    report = {
        "task": task.value,
        "exporter": exporter,
        "reference": reference.as_dict(),
        "max_metric_drop": max_metric_drop,
        "num_validation_examples": batches.num_examples,
        "variants": rows,
    }
    manifest = {
        "format": "hf_distill-onnx/1",
        "task": task.value,
        "inputs": input_names_for(model),
        "outputs": ["logits"],
        "variants": {r["variant"]: r["file"] for r in rows if r["passed"]},
        "default_variant": _default_variant(rows),
        "max_length": int(min(max_length, getattr(model.config, "max_position_embeddings", max_length) or max_length)),
        "id2label": {str(k): v for k, v in (model.config.id2label or {}).items()} if task is not Task.CAUSAL_LM else {},
        "pad_token_id": _pad_id(tokenizer, model),
        "eos_token_id": getattr(model.config, "eos_token_id", None),
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


def _pad_id(tokenizer: Any, model: PreTrainedModel) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0
