"""The gate's inputs: up to ``limit`` rows of the user's validation data as padded numpy batches with their labels.

Raw text is tokenized like training (``truncation=True, max_length``; sentence pairs by :func:`hf_distill.data.
text_columns`); pre-tokenized rows keep their own ``token_type_ids``. Batches are right-padded with the export's pad
id; labels are class ids, token labels, next-token ids (causal LM) or float targets (regression heads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_distill.data import AUTO, text_columns
from hf_distill.export.inputs import input_names_for, is_regression, pad_id
from hf_distill.tasks import IGNORE_INDEX, Task

logger = logging.getLogger(__name__)


@dataclass
class EvalBatches:
    """Padded numpy inputs per batch, with labels; ``text_columns`` names the raw-text columns used (if any)."""

    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    regression: bool = False
    text_columns: list[str] | None = None

    @property
    def num_examples(self) -> int:
        return sum(len(b) for b in self.labels)


@dataclass
class _Columns:
    """Where a table's inputs and labels are: pre-tokenized ``input_ids`` or one/two text columns."""

    pretokenized: bool
    label: str
    text: tuple[str, str | None] | None = None


def _columns(
    data: Any, tokenizer: Any, task: Task, text_column: str, text_pair_column: str | None, label_column: str
) -> _Columns:
    """Check the table's columns before any work; raise a ValueError naming the missing one."""
    if data is None:
        raise ValueError(
            "export_onnx validates every variant on real data: pass validation_data= (a datasets.Dataset "
            f"with '{text_column}' and '{label_column}' columns, or tokenized 'input_ids' and 'labels')."
        )
    columns = list(getattr(data, "column_names", None) or [])
    pretokenized = "input_ids" in columns
    text = None if pretokenized else text_columns(columns, text_column, text_pair_column)
    if not pretokenized and tokenizer is None:
        raise ValueError("Raw-text validation data needs a tokenizer: save it next to the model or pass tokenizer=.")
    label = "labels" if "labels" in columns else label_column
    if task is not Task.CAUSAL_LM and label not in columns:
        raise ValueError(
            f"Validation data has columns {columns} but no labels ('labels' or '{label_column}'): the "
            "accuracy gate needs them."
        )
    if task is Task.TOKEN_CLASSIFICATION and not pretokenized:
        raise ValueError("Token classification validation data must be tokenized with word-aligned 'labels'.")
    return _Columns(pretokenized, label, text)


def _pad(rows: list[list[int]], width: int, value: int) -> np.ndarray:
    return np.array([list(r) + [value] * (width - len(r)) for r in rows], dtype=np.int64)


def _encode(chunk: dict[str, list], where: _Columns, tokenizer: Any, max_length: int) -> dict[str, list[list[int]]]:
    """Token ids (and token types, when the data or tokenizer gives them) of one chunk, unpadded."""
    if where.pretokenized:
        encoded = {"input_ids": [list(x)[:max_length] for x in chunk["input_ids"]]}
        if "token_type_ids" in chunk:
            encoded["token_type_ids"] = [list(x)[:max_length] for x in chunk["token_type_ids"]]
        return encoded
    first, second = where.text
    encoded = tokenizer(
        list(chunk[first]), list(chunk[second]) if second else None, truncation=True, max_length=max_length
    )
    return {k: encoded[k] for k in ("input_ids", "token_type_ids") if k in encoded}


def _labels(
    chunk: dict[str, list], where: _Columns, task: Task, feed: dict[str, np.ndarray], regression: bool
) -> np.ndarray:
    if task is Task.CAUSAL_LM:
        return np.where(feed["attention_mask"] == 1, feed["input_ids"], IGNORE_INDEX)
    if task is Task.TOKEN_CLASSIFICATION:
        width = feed["input_ids"].shape[1]
        return _pad([list(x)[:width] for x in chunk[where.label]], width, IGNORE_INDEX)
    values = np.asarray(chunk[where.label])
    if values.ndim != 1:
        raise ValueError(
            f"Validation labels '{where.label}' hold one value per row for the gate; got shape {values.shape[1:]} "
            "per row (multi-label targets are not gated)."
        )
    # A regression head's targets are floats: casting them to int would score the wrong numbers.
    return values.astype(np.float32 if regression else np.int64)


def _chat_as_text(data: Any, tokenizer: Any, text_column: str) -> Any:
    """Chat rows (``messages``, or ``prompt`` + ``response``) of a causal LM without ``text_column``, rendered as
    that column through the tokenizer's chat template: the same rows the KV-cache export path reads."""
    columns = getattr(data, "column_names", None) or []
    chat = "messages" in columns or {"prompt", "response"} <= set(columns)
    if text_column in columns or not chat or not getattr(tokenizer, "chat_template", None):
        return data
    from hf_distill.chat import conversation

    def render(row: dict[str, Any]) -> dict[str, str]:
        messages = conversation(row, prompt_column="prompt", response_column="response", system_prompt=None)
        return {text_column: tokenizer.apply_chat_template(messages, tokenize=False)}

    return data.map(render, desc="Rendering chat rows")


def make_batches(
    data: Any,
    tokenizer: Any,
    model: Any,
    task: Task,
    *,
    text_column: str,
    label_column: str,
    limit: int,
    max_length: int,
    batch_size: int,
    text_pair_column: str | None = AUTO,
) -> EvalBatches:
    """Tokenize (if needed) and pad up to ``limit`` examples of the user's data; column errors come first.

    Raises:
        ValueError: missing columns or tokenizer, empty data, or regression targets that are all equal (R² is
            undefined then).
    """
    if task is Task.CAUSAL_LM:
        data = _chat_as_text(data, tokenizer, text_column)
    where = _columns(data, tokenizer, task, text_column, text_pair_column, label_column)
    rows = data.select(range(min(limit, len(data))))
    pad, names = pad_id(tokenizer, model.config), input_names_for(model)
    regression = task is Task.SEQUENCE_CLASSIFICATION and is_regression(model.config)
    batches = EvalBatches(regression=regression, text_columns=[c for c in where.text or () if c])
    truncated = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if where.pretokenized:
            truncated += sum(len(x) > max_length for x in chunk["input_ids"])
        encoded = _encode(chunk, where, tokenizer, max_length)
        width = max(len(x) for x in encoded["input_ids"])
        feed = {
            "input_ids": _pad(encoded["input_ids"], width, pad),
            "attention_mask": _pad([[1] * len(x) for x in encoded["input_ids"]], width, 0),
        }
        if "token_type_ids" in names:  # segment ids of sentence pairs matter: keep the data's own
            types = encoded.get("token_type_ids") or [[0] * len(x) for x in encoded["input_ids"]]
            feed["token_type_ids"] = _pad(types, width, 0)
        batches.inputs.append(feed)
        batches.labels.append(_labels(chunk, where, task, feed, regression))
    if not batches.inputs:
        raise ValueError("Validation data is empty.")
    if truncated:
        logger.warning(
            "%d pre-tokenized validation rows are longer than %d tokens; cut to that length.", truncated, max_length
        )
    if regression and np.ptp(np.concatenate(batches.labels)) == 0:
        raise ValueError("The validation regression labels are all equal: R² is undefined; pass varied targets.")
    return batches
