"""Which exporter a model goes through: the one rule used by `export_onnx`, `export_llm`, `hf-distill export` and the
pipeline's export stage.

- ``onnxruntime-genai``: decoder LMs whose architecture onnxruntime-genai's model builder supports. The graph keeps a
  KV cache, so each new token costs one position, not a re-read of the whole sequence.
- ``torch.onnx``: everything else (classifiers, token classifiers, decoder LMs the builder does not know, soft-prompted
  decoder LMs), a logits-only graph; a causal LM exported this way has no KV cache, and the choice says why.

The builder does not publish its architecture list: it dispatches on ``config.architectures[0]`` in one if/elif
chain, so the supported names are read from the installed builder's source (no import: the builder imports torch and
transformers at module level) and the known 0.18 list is used only when that source cannot be read.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_distill.tasks import Task, infer_task, unwrap_model

ENGINES = ("auto", "genai", "torch")
GENAI = "onnxruntime-genai"
TORCH = "torch.onnx"
# onnxruntime-genai 0.18's decoder architectures, for a builder whose source cannot be read (a frozen install).
KNOWN_ARCHITECTURES = frozenset(
    {
        "ChatGLMForConditionalGeneration",
        "Ernie4_5ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GraniteForCausalLM",
        "InternLM2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
_DISPATCH = re.compile(r"""config\.architectures\[0\]\s*==\s*["'](\w+)["']""")


@dataclass(frozen=True)
class EngineChoice:
    """The exporter chosen for one model and why (recorded in export_report.json and the pipeline report)."""

    engine: str  # GENAI or TORCH
    reason: str
    architecture: str
    kv_cache: bool
    causal_lm: bool  # a decoder LM: exported without a KV cache, it re-reads the whole sequence for each token

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "engine_reason": self.reason, "kv_cache": self.kv_cache}


@functools.cache
def builder_architectures() -> frozenset[str]:
    """The decoder architectures (transformers class names) the installed model builder dispatches on; empty when
    onnxruntime-genai is not installed."""
    try:
        spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    except ImportError:  # the parent package is missing
        spec = None
    if spec is None or spec.origin is None:
        return frozenset()
    try:
        names = set(_DISPATCH.findall(Path(spec.origin).read_text(encoding="utf-8")))
    except OSError:
        names = set()
    # Whisper is a speech encoder-decoder: not a decoder LM, even though the builder converts it.
    return frozenset(names - {"WhisperForConditionalGeneration"}) or KNOWN_ARCHITECTURES


def _architecture(model: Any) -> tuple[str, bool]:
    """(transformers class name of the backbone, whether a PEFT prompt-learning adapter wraps it)."""
    peft = getattr(model, "active_peft_config", None)
    # A LoRA-style adapter is merged before the build, so the base model's architecture is what the builder sees.
    return type(unwrap_model(model)).__name__, bool(peft is not None and peft.is_prompt_learning)


def choose_engine(model: Any, engine: str = "auto") -> EngineChoice:
    """The exporter for ``model`` (a transformers model, possibly PEFT-wrapped).

    ``engine``: ``"auto"`` (onnxruntime-genai for supported decoder LMs, torch.onnx otherwise), ``"genai"`` (require
    onnxruntime-genai) or ``"torch"`` (force the logits-only graph, no KV cache).

    Raises:
        ValueError: an unknown ``engine``, or ``"genai"`` for a model the builder cannot export (the reason says why).
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown export engine {engine!r}; choose from {list(ENGINES)}.")
    architecture, prompt_learning = _architecture(model)
    causal = _is_causal(model)
    if engine == "torch":
        reason = "engine='torch' requested" + (" (no KV cache)" if causal else "")
        return EngineChoice(TORCH, reason, architecture, False, causal)
    reason = _why_not_genai(causal, architecture, prompt_learning)
    if reason is None:
        reason = f"{architecture} is supported by onnxruntime-genai's model builder: KV cache, fused attention"
        return EngineChoice(GENAI, reason, architecture, True, causal)
    if engine == "genai":
        raise ValueError(
            f"onnxruntime-genai cannot export this model: {reason}. export_onnx with engine='auto' or 'torch' "
            "exports it without a KV cache."
        )
    return EngineChoice(TORCH, reason, architecture, False, causal)


def _is_causal(model: Any) -> bool:
    try:
        return infer_task(model) is Task.CAUSAL_LM
    except ValueError:  # a head hf_distill does not know: export_onnx reports it
        return False


def _why_not_genai(causal: bool, architecture: str, prompt_learning: bool) -> str | None:
    """Why onnxruntime-genai cannot export the model (None: it can)."""
    if not causal:
        return f"{architecture} is not a decoder LM (nothing is generated, so no KV cache is needed)"
    if prompt_learning:
        return (
            "it is a prompt-tuned (PEFT prompt learning) causal LM, whose soft prompt only a logits-only graph "
            "takes (baked in, or as an input)"
        )
    supported = builder_architectures()
    if not supported:
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    if architecture not in supported:
        return (
            f"onnxruntime-genai's model builder does not support {architecture} (it supports "
            f"{', '.join(sorted(supported))})"
        )
    return None
