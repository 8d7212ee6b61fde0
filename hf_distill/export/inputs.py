"""What an exported graph takes and gives: input names, token types, the pad id, the usable positions, the
tokenizer's padding/truncation rule, where a classifier is read, regression heads. One rule for all.

The exporter, the accuracy gate, the benchmark and the manifest (which the edge runner reads) all ask here, so
they cannot disagree about whether a model takes ``token_type_ids``, how long an input may be or how it is padded.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

PROMPT_INPUT = "prompt_embeds"


def uses_token_types(model: Any) -> bool:
    """True when the model has segment embeddings and its forward takes ``token_type_ids`` (BERT, not RoBERTa-less
    DistilBERT or decoder LMs)."""
    base = getattr(model, "get_base_model", None)
    model = base() if callable(base) else model
    return (
        bool(getattr(model.config, "type_vocab_size", 0))
        and "token_type_ids" in inspect.signature(model.forward).parameters
    )


def input_names_for(model: Any, prompt_as_input: bool = False) -> list[str]:
    """Graph input names, in order: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``, ``prompt_embeds``)."""
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(model) else [])
    return names + ([PROMPT_INPUT] if prompt_as_input else [])


def pad_id(tokenizer: Any, config: Any) -> int:
    """The id padding positions get: the tokenizer's, else the model config's, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def usable_positions(config: Any, default: int = 8192) -> int:
    """How many tokens one input may hold: ``max_position_embeddings``, less RoBERTa-style models' offset.

    RoBERTa (and XLM-R, CamemBERT, ...) number positions from ``padding_idx + 1``, so ``padding_idx + 1`` of the
    table's rows can never be used by a real token (514 rows, 512 usable for ``roberta-base``; 34 rows, 32 usable).
    ``config`` is a transformers config (its attribute map turns GPT-2's ``n_positions`` into
    ``max_position_embeddings``); models without a position table get ``default``.
    """
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return default
    if getattr(config, "model_type", "") in _OFFSET_POSITION_TYPES:
        pad = getattr(config, "pad_token_id", None)
        positions -= (1 if pad is None else int(pad)) + 1
    return int(positions)


def graph_positions(config: Any, virtual_tokens: int = 0) -> int:
    """Longest token input the exported graph takes: the usable positions less a soft prompt's virtual tokens.

    Raises:
        ValueError: the prompt leaves no position for the input.
    """
    budget = usable_positions(config, 10**9) - virtual_tokens
    if budget < 1:
        raise ValueError(f"The prompt's {virtual_tokens} virtual tokens leave no room for input positions.")
    return budget


def is_regression(config: Any) -> bool:
    """A sequence-classification head that predicts one number (``num_labels=1`` or ``problem_type='regression'``):
    transformers trains it with MSE, so it is gated with a regression metric and the edge runner prints the value."""
    problem = getattr(config, "problem_type", None)
    return problem == "regression" or (problem is None and getattr(config, "num_labels", 2) == 1)


def reads_last_position(model: Any) -> bool:
    """True for decoder classifiers (a ``score`` head on a causal backbone: Llama, Qwen2, Mistral, GPT-2, ...).

    They are read at the last real token. transformers finds it from ``input_ids != pad_token_id``, which it cannot
    do for ``inputs_embeds`` (a soft prompt) and gets wrong when the tokenizer pads with another id; the export
    reads the last *attended* position (from the attention mask) instead, which is where a row alone ends.
    """
    from hf_distill.tasks import Task, infer_task, unwrap_model

    base = unwrap_model(model)
    return (
        infer_task(base) is Task.SEQUENCE_CLASSIFICATION
        and hasattr(base, "score")
        and hasattr(base, getattr(base, "base_model_prefix", "") or "?")
    )


# --- the tokenizer rule: how the device turns text into graph inputs ------------------------------------------------


def tokenization_rule(tokenizer: Any, config: Any, max_length: int) -> dict[str, Any]:
    """The padding/truncation rule written into the exported ``tokenizer.json`` and the manifest.

    Pad each batch to its longest row, on the right, with the manifest's pad id (type id 0); truncate longer inputs
    to ``max_length`` tokens including special tokens, longest sequence of a pair first (what
    ``tokenizer(..., truncation=True, max_length=max_length)`` does in training). The attention mask and token type
    ids come from the encoding itself. A checkpoint's own setting (e.g. MiniLM's fixed 128-token padding) is replaced.
    """
    pad = pad_id(tokenizer, config)
    token = getattr(tokenizer, "pad_token", None)
    if token is None and tokenizer is not None:
        token = tokenizer.convert_ids_to_tokens(pad)
    return {
        "padding": "longest",
        "padding_side": "right",
        "pad_token_id": pad,
        "pad_token": str(token or "[PAD]"),
        "pad_type_id": 0,
        "truncation": "longest_first",
        "truncation_side": "right",
        "max_length": int(max_length),
    }


def write_tokenization_rule(tokenizer_json: str | Path, rule: dict[str, Any]) -> None:
    """Set the ``padding`` and ``truncation`` sections of a saved ``tokenizer.json`` to ``rule``."""
    path = Path(tokenizer_json)
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": rule["pad_token_id"],
        "pad_type_id": rule["pad_type_id"],
        "pad_token": rule["pad_token"],
    }
    spec["truncation"] = {
        "direction": "Right",
        "max_length": rule["max_length"],
        "strategy": "LongestFirst",
        "stride": 0,
    }
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


# Model types whose position ids start at padding_idx + 1 (create_position_ids_from_input_ids in transformers).
_OFFSET_POSITION_TYPES = {
    "roberta",
    "xlm-roberta",
    "camembert",
    "longformer",
    "mpnet",
    "ibert",
    "data2vec-text",
    "roberta-prelayernorm",
    "xmod",
    "lilt",
    "markuplm",
    "luke",
    "mluke",
    "esm",
}
