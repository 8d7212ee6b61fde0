"""Decoder-LM export with a KV cache: onnxruntime-genai's model builder, behind a perplexity and greedy gate.

The builder (``python -m onnxruntime_genai.models.builder``) is a well-kept library that already writes fused
attention (GroupQueryAttention), rotary embeddings, a KV cache and int4/int8 MatMulNBits weights for the
architectures it knows; we call its command line (its stable interface) in a subprocess, one variant per folder,
and validate every variant on the user's held-out text against PyTorch fp32 before it may ship:

- perplexity, teacher-forced through the exported model (prefill path): at most ``max_ppl_increase`` percent above
  PyTorch's;
- greedy agreement: PyTorch's first ``num_greedy_tokens`` greedy tokens after each of ``num_prompts`` prompts; the
  share of them the exported model also ranks first given the same preceding tokens must reach
  ``min_greedy_agreement``. The exported model's own free-running generation (decode path, KV cache) is reported
  beside it as ``greedy_prefix``: the mean share of its tokens before the first difference from PyTorch's.

An ``int4`` variant that fails climbs :data:`INT4_LADDER` (smaller blocks, fp32 activations, int8 ``lm_head``).
Which models come here at all is decided in one place: :func:`hf_distill.export.engine.choose_engine`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GENAI_VARIANTS = ("fp32", "int8", "int4")
# onnxruntime's MatMulNBits: block sizes the builder accepts, and its accuracy levels (0: default, 1: fp32, 2: fp16,
# 3: bf16, 4: int8 activations).
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def check_quantization_options(block_size: int, accuracy_level: int) -> None:
    """Raises: ValueError: a block size or accuracy level the builder would silently replace."""
    if block_size not in BLOCK_SIZES or accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(
            f"block_size (--block-size) must be one of {BLOCK_SIZES} and accuracy_level (--accuracy-level) one of "
            f"{ACCURACY_LEVELS} (onnxruntime's MatMulNBits); got {block_size} and {accuracy_level}."
        )


GENAI_CONFIG = "genai_config.json"
# Tried in order for int4 until one passes the gate: round-to-nearest, then smaller blocks, fp32 activations,
# k-quant (llama.cpp's error-minimising scales), then int8 for the most sensitive matrices (lm_head, mixed layers).
INT4_LADDER: tuple[dict[str, str], ...] = (
    {"block_size": "32", "accuracy_level": "4"},
    {"block_size": "16", "accuracy_level": "4"},
    {"block_size": "32", "accuracy_level": "1"},
    {"block_size": "32", "accuracy_level": "4", "algo_config": "k_quant"},
    {"block_size": "32", "accuracy_level": "4", "matmul_mixed_precision": "last_matmul:int8"},
    {
        "block_size": "32",
        "accuracy_level": "4",
        "algo_config": "k_quant",
        "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8",
    },
)


def build_variant(model_dir: str | os.PathLike, target: Path, variant: str, options: dict[str, str]) -> None:
    """Run the model builder for one variant into ``target`` (created; removed again on failure).

    Raises:
        ValueError: an unknown variant, or the builder failed (its last error lines are in the message).
    """
    if variant not in GENAI_VARIANTS:
        raise ValueError(f"Unknown decoder-LM variant {variant!r}; choose from {list(GENAI_VARIANTS)}.")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(target)]
    command += ["-p", variant, "-e", "cpu", "-c", str(target / ".cache")]
    if options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(target / ".cache", ignore_errors=True)
    if done.returncode != 0 or not (target / GENAI_CONFIG).is_file():
        shutil.rmtree(target, ignore_errors=True)
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise ValueError(f"onnxruntime-genai's model builder failed for {variant} ({options}):\n{tail}")


def genai_logits(folder: str | os.PathLike, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Teacher-forced logits ``[len(seq), vocab]`` of each token sequence through the exported model."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    outputs = []
    for ids in sequences:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        outputs.append(np.asarray(generator.get_output("logits"), dtype=np.float32)[0])
    return outputs


def genai_greedy(folder: str | os.PathLike, prompts: Sequence[Sequence[int]], num_tokens: int) -> list[list[int]]:
    """The first ``num_tokens`` greedy tokens the exported model generates after each prompt (stops at EOS)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    results = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + num_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < num_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        results.append(tokens)
    return results


def perplexity(logits: Sequence[np.ndarray], sequences: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token NLL) over every position of every sequence (position i predicts token i + 1)."""
    nll, count = 0.0, 0
    for rows, ids in zip(logits, sequences, strict=True):
        rows = rows[:-1].astype(np.float64)
        log_z = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
        targets = np.asarray(ids[1:])
        nll += float((log_z - rows[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(nll / max(count, 1))


def token_agreement(
    folder: str | os.PathLike, prompts: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
) -> float:
    """Share of PyTorch's greedy tokens that the exported model also ranks first, given the same preceding tokens.

    Each prompt is followed by PyTorch's greedy continuation (teacher forcing), so one early divergence does not
    count against every later position, as it does when two free-running generations are compared.
    """
    sequences = [[*p, *r] for p, r in zip(prompts, reference, strict=True)]
    hits = total = 0
    for logits, prompt, continuation in zip(genai_logits(folder, sequences), prompts, reference, strict=True):
        if not continuation:
            continue
        predicted = logits[len(prompt) - 1 : len(prompt) - 1 + len(continuation)].argmax(-1)
        hits += int((predicted == np.asarray(continuation)).sum())
        total += len(continuation)
    return hits / total if total else 1.0


def prefix_agreement(candidate: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of (common prefix length / reference length): 1.0 when every greedy run matches."""
    scores = []
    for ours, theirs in zip(candidate, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        common = min(len(ours), len(theirs)) if same is None else same
        scores.append(1.0 if not theirs else common / len(theirs))
    return float(np.mean(scores)) if scores else 0.0


def gate(row: dict[str, Any], reference: dict[str, Any], max_ppl_increase: float, min_agreement: float) -> dict:
    """Mark ``row`` (perplexity, greedy_agreement) passed or failed against the PyTorch reference, with a reason."""
    increase = 100.0 * (row["perplexity"] / reference["perplexity"] - 1.0)
    reasons = []
    if not math.isfinite(row["perplexity"]):
        reasons.append("non-finite perplexity")
    elif increase > max_ppl_increase:
        reasons.append(f"perplexity +{increase:.2f} % > max_ppl_increase {max_ppl_increase} %")
    if row["greedy_agreement"] < min_agreement:
        reasons.append(f"greedy agreement {row['greedy_agreement']:.3f} < min_greedy_agreement {min_agreement}")
    return {**row, "ppl_increase_pct": increase, "passed": not reasons, "reason": "; ".join(reasons) or None}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_json(path: Path, value: Any) -> None:
    """``value`` as strict JSON: NaN and infinities (a rung that could not be measured) are written as null, which
    every JSON reader accepts (``NaN`` is Python's extension)."""
    path.write_text(json.dumps(_finite(value), indent=2, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
