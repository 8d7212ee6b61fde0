"""`export_llm`: a decoder LM -> a folder of onnxruntime-genai variants with a KV cache, each gated against PyTorch.

Layout of the folder (written to a temporary sibling and moved into place only when the export succeeded)::

    output_dir/
      fp32/ int8/ int4/           one onnxruntime-genai folder per variant (genai_config.json, model.onnx, tokenizer)
      hf_distill_manifest.json    format hf_distill-genai/1: variants that passed, default variant
      export_report.json          the PyTorch reference and every variant's numbers and attempts
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_distill.atomic import atomic_folder
from hf_distill.export import genai
from hf_distill.export.engine import EngineChoice, choose_engine
from hf_distill.export.validate import GateError
from hf_distill.loading import load_model
from hf_distill.tasks import Task

logger = logging.getLogger(__name__)
UNUSABLE_PERPLEXITY = 1000.0
MANIFEST = "hf_distill_manifest.json"
REPORT = "export_report.json"


@dataclass
class LLMProbe:
    """What every variant is measured on: full token sequences (perplexity) and prompts (greedy generation)."""

    sequences: list[list[int]]
    prompts: list[list[int]]


def make_probe(
    data: Any, tokenizer: Any, *, text_column: str, num_validation: int, num_prompts: int, max_length: int
) -> LLMProbe:
    """Sequences and prompts from the user's held-out rows: ``messages`` / ``prompt`` + ``response`` (chat template),
    raw text (``text_column``) or tokenized ``input_ids``.

    Raises:
        ValueError: no data, no usable column, or every row shorter than 2 tokens.
    """
    if data is None or len(data) == 0:
        raise ValueError("export_llm validates every variant on held-out text: pass validation_data= (rows).")
    columns = list(data.column_names)
    rows = data.select(range(min(len(data), max(num_validation, num_prompts))))
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    sequences, prompts = [], []
    for row in rows:
        if "input_ids" in columns:
            ids = list(row["input_ids"])[:max_length]
            prompt = ids[: max(1, len(ids) // 2)]
        elif "messages" in columns or "prompt" in columns:
            from hf_distill.chat import assistant_labels, conversation

            messages = conversation(row, prompt_column="prompt", response_column="response", system_prompt=None)
            ids = assistant_labels(tokenizer, messages)[0][:max_length]
            rendered = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
            prompt = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)[:max_length]
        elif text_column in columns:
            ids = tokenizer(row[text_column], truncation=True, max_length=max_length)["input_ids"]
            prompt = ids[: max(1, len(ids) // 2)]
        else:
            raise ValueError(
                f"Validation rows have columns {columns}: need 'messages', 'prompt'/'response', "
                f"'{text_column}' (set text_column= / --text-column) or 'input_ids'."
            )
        # A prompt ending in EOS makes the generator report the previous position's logits: never end on it.
        while prompt and eos is not None and prompt[-1] == eos:
            prompt = prompt[:-1]
        if len(ids) >= 2:
            sequences.append(ids)
        if prompt:
            prompts.append(prompt)
    if not sequences:
        raise ValueError("Every validation row is shorter than 2 tokens: nothing to score.")
    return LLMProbe(sequences[:num_validation], prompts[:num_prompts])


@torch.no_grad()
def reference(model: Any, probe: LLMProbe, num_tokens: int) -> dict[str, Any]:
    """PyTorch fp32: perplexity of the sequences and greedy tokens after each prompt."""
    model = model.float().eval()
    logits = [model(torch.tensor([ids]), use_cache=False).logits[0].numpy() for ids in probe.sequences]
    greedy = []
    for ids in probe.prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=num_tokens, do_sample=False, top_k=None, top_p=None)
        greedy.append(out[0, len(ids) :].tolist())
    return {"engine": "pytorch", "perplexity": genai.perplexity(logits, probe.sequences), "greedy": greedy}


def export_llm(
    model_or_dir: Any,
    output_dir: str | os.PathLike,
    *,
    variants: Sequence[str] = ("int4",),
    validation_data: Any = None,
    tokenizer: Any = None,
    text_column: str = "text",
    num_validation: int = 16,
    num_prompts: int = 8,
    num_greedy_tokens: int = 32,
    max_length: int = 256,
    max_ppl_increase: float = 5.0,
    min_greedy_agreement: float = 0.8,
    block_size: int = 32,
    accuracy_level: int = 4,
    fail_on_gate: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a decoder LM with onnxruntime-genai's model builder (KV cache) and gate each variant.

    ``variants`` from ``fp32``, ``int8``, ``int4`` (``block_size``, ``accuracy_level`` for int4/int8: see
    :data:`~hf_distill.export.genai.INT4_LADDER`). The caller's model is never modified (a LoRA adapter is merged
    into a copy). Returns the report (also ``export_report.json``).

    Raises:
        ValueError: unknown variants, an architecture the builder does not support, an existing non-empty
            ``output_dir`` without ``overwrite``, bad validation data.
        GateError: a variant failed the gate and ``fail_on_gate`` (nothing is written).
    """
    unknown = [v for v in variants if v not in genai.GENAI_VARIANTS]
    if unknown or not variants:
        raise ValueError(
            f"Unknown decoder-LM variants {unknown or variants}; choose from {list(genai.GENAI_VARIANTS)}."
        )
    genai.check_quantization_options(block_size, accuracy_level)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{str(output_dir)!r} exists and is not empty; pass overwrite=True (--force). Nothing written."
        )
    model, tokenizer, choice = _prepare(model_or_dir, tokenizer)
    probe = make_probe(
        validation_data,
        tokenizer,
        text_column=text_column,
        num_validation=num_validation,
        num_prompts=num_prompts,
        max_length=max_length,
    )
    logger.info(
        "PyTorch fp32 reference: perplexity of %d sequences, %d greedy tokens after %d prompts (then each variant)",
        len(probe.sequences),
        num_greedy_tokens,
        len(probe.prompts),
    )
    ref = reference(copy.deepcopy(model), probe, num_greedy_tokens)
    if ref["perplexity"] > UNUSABLE_PERPLEXITY:
        logger.warning(
            "The model's own (PyTorch fp32) perplexity on this data is %.0f: it barely models it (an untrained cut?). "
            "The gate compares each variant with it anyway; quantization differences on such a model mean little.",
            ref["perplexity"],
        )
    with atomic_folder(output_dir) as staging:
        source = staging / ".hf_source"
        model.save_pretrained(source, safe_serialization=True)
        tokenizer.save_pretrained(source)
        options = {"block_size": str(block_size), "accuracy_level": str(accuracy_level)}
        rows = [
            _variant(source, staging, v, probe, ref, options, max_ppl_increase, min_greedy_agreement) for v in variants
        ]
        shutil.rmtree(source)
        report = _write(staging, rows, ref, probe, max_ppl_increase, min_greedy_agreement, choice)
        failed = [r["variant"] for r in rows if not r["passed"]]
        if failed and fail_on_gate:
            raise GateError(failed, report)
    return report


def _prepare(model_or_dir: Any, tokenizer: Any) -> tuple[Any, Any, EngineChoice]:
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, folder_tokenizer = load_model(model_or_dir, Task.CAUSAL_LM, purpose="export")
        tokenizer = tokenizer or folder_tokenizer
    else:
        model = copy.deepcopy(model_or_dir)  # never modify the caller's model
    choice = choose_engine(model, "genai")  # the one rule shared with export_onnx, the CLI and the pipeline
    logger.info("%s: exporting with a KV cache through %s (%s)", choice.architecture, choice.engine, choice.reason)
    if getattr(model, "active_peft_config", None) is not None:  # LoRA-style: folded into the copy's weights
        model = model.merge_and_unload()
    if tokenizer is None:
        raise ValueError("export_llm needs the tokenizer: save it next to the model or pass tokenizer=.")
    return model.eval(), tokenizer, choice


def _variant(
    source: Path,
    staging: Path,
    variant: str,
    probe: LLMProbe,
    ref: dict[str, Any],
    options: dict[str, str],
    max_ppl_increase: float,
    min_agreement: float,
) -> dict[str, Any]:
    """Build, measure and gate one variant; int4 climbs the ladder until a rung passes."""
    ladder = [options] if variant != "int4" else [options, *[r for r in genai.INT4_LADDER if r != options]]
    attempts: list[dict[str, Any]] = []
    row: dict[str, Any] = {}
    for rung in ladder if variant != "fp32" else [{}]:
        row = _attempt(source, staging / variant, variant, rung, probe, ref, max_ppl_increase, min_agreement)
        keys = ("settings", "perplexity", "greedy_agreement", "greedy_prefix", "passed", "reason")
        attempts.append({k: row.get(k) for k in keys})
        logger.info(
            "%s %s: perplexity %.3f (ref %.3f), greedy agreement %.3f -> %s",
            variant,
            rung,
            row["perplexity"],
            ref["perplexity"],
            row["greedy_agreement"],
            "pass" if row["passed"] else "FAIL",
        )
        if row["passed"]:
            break
    if not row["passed"] and len(attempts) > 1:  # every rung failed: say why each did, not only the last
        row["reason"] = f"all {len(attempts)} rungs failed: " + "; ".join(
            f"{a['settings'] or 'default'}: {a['reason']}" for a in attempts
        )
    return {**row, "attempts": attempts, "kv_cache": True, "exporter": "onnxruntime-genai model builder"}


def _attempt(
    source: Path,
    target: Path,
    variant: str,
    rung: dict[str, str],
    probe: LLMProbe,
    ref: dict[str, Any],
    max_ppl_increase: float,
    min_agreement: float,
) -> dict[str, Any]:
    """One rung: build, measure, gate. A rung the builder or the runtime cannot handle fails with its reason."""
    shutil.rmtree(target, ignore_errors=True)
    row: dict[str, Any] = {"variant": variant, "folder": variant, "settings": rung}
    try:
        genai.build_variant(source, target, variant, rung)
        row["size_bytes"] = genai.folder_size(target)
        row["perplexity"] = genai.perplexity(genai.genai_logits(target, probe.sequences), probe.sequences)
        greedy = genai.genai_greedy(target, probe.prompts, max((len(g) for g in ref["greedy"]), default=1))
        row["greedy_prefix"] = genai.prefix_agreement(greedy, ref["greedy"])
        row["greedy_agreement"] = genai.token_agreement(target, probe.prompts, ref["greedy"])
    except (ValueError, RuntimeError) as err:  # onnxruntime-genai reports an invalid graph as RuntimeError
        shutil.rmtree(target, ignore_errors=True)
        reason = f"{type(err).__name__}: {str(err).splitlines()[-1][:300]}"
        return {
            **row,
            "size_bytes": 0,
            "perplexity": float("inf"),
            "greedy_agreement": 0.0,
            "greedy_prefix": 0.0,
            "ppl_increase_pct": float("inf"),
            "passed": False,
            "reason": reason,
        }
    return genai.gate(row, ref, max_ppl_increase, min_agreement)


def _write(
    staging: Path,
    rows: list[dict[str, Any]],
    ref: dict[str, Any],
    probe: LLMProbe,
    max_ppl_increase: float,
    min_agreement: float,
    choice: EngineChoice,
) -> dict[str, Any]:
    passed = [r["variant"] for r in rows if r["passed"]]
    default = next((v for v in ("int4", "int8", "fp32") if v in passed), None)
    report = {
        "task": Task.CAUSAL_LM.value,
        "format": "hf_distill-genai/1",
        **choice.as_dict(),
        "architecture": choice.architecture,
        "reference": {"engine": "pytorch", "metric": "perplexity", "value": ref["perplexity"]},
        "max_ppl_increase": max_ppl_increase,
        "min_greedy_agreement": min_agreement,
        "max_metric_drop": max_ppl_increase,
        "num_validation_sequences": len(probe.sequences),
        "num_prompts": len(probe.prompts),
        "variants": [
            {
                **r,
                "metric": "perplexity",
                "metric_value": r["perplexity"],
                "metric_drop": r["ppl_increase_pct"],
                "max_abs_diff": None,  # logits are compared through perplexity and greedy agreement
                "file": r["folder"],
            }
            for r in rows
        ],
    }
    manifest = {
        "format": "hf_distill-genai/1",
        "task": Task.CAUSAL_LM.value,
        "kv_cache": True,
        "engine": choice.engine,
        "variants": {v: v for v in passed},
        "default_variant": default,
    }
    genai.write_json(staging / MANIFEST, manifest)
    genai.write_json(staging / REPORT, report)
    return report
