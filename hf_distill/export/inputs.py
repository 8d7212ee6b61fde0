"""What an exported graph takes: input names, token types, the pad id and the usable positions. One rule for all.

The exporter, the accuracy gate, the benchmark and the manifest (which the edge runner reads) all ask here, so
they cannot disagree about whether a model takes ``token_type_ids`` or how long an input may be.
"""

from __future__ import annotations

import inspect
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
    table's rows can never be used by a real token (514 rows, 512 usable for ``roberta-base``).
    """
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return default
    if getattr(config, "model_type", "") in _OFFSET_POSITION_TYPES:
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return int(positions)


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
