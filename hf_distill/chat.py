"""Chat data for causal-LM distillation: prompt/response rows or chat ``messages`` through the chat template.

Labels are the assistant's tokens only (the response and the template's end-of-turn marker, so the student learns
to stop); every system, user and template token is -100, the same convention as TRL's ``assistant_only_loss``.
The tokenizer's own ``apply_chat_template`` renders each conversation; we only find where each assistant turn
starts and ends, by rendering the conversation up to that turn (with the generation prompt) and after it.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import datasets

from hf_distill.tasks import IGNORE_INDEX

logger = logging.getLogger(__name__)


class ChatTokenization(NamedTuple):
    """The tokenized dataset (``input_ids``, ``attention_mask``, ``labels``) and what truncation did to it."""

    dataset: datasets.Dataset
    num_truncated: int  # conversations cut at max_length (their labels end with the cut)
    num_dropped: int  # conversations without an answer, or with no assistant token left after the cut (removed)


def conversation(row: dict[str, Any], *, prompt_column: str, response_column: str, system_prompt: str | None) -> list:
    """The chat ``messages`` of one row: its own ``messages`` list, or a user prompt and an assistant response."""
    if "messages" in row and row["messages"]:
        messages = list(row["messages"])
    else:
        if prompt_column not in row or response_column not in row:
            raise ValueError(
                f"Chat rows need 'messages' or '{prompt_column}' and '{response_column}' columns; got {sorted(row)}. "
                "Set prompt_column= / response_column=."
            )
        messages = [
            {"role": "user", "content": row[prompt_column]},
            {"role": "assistant", "content": row[response_column]},
        ]
    if system_prompt is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _render(tokenizer: Any, messages: list, generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def assistant_labels(tokenizer: Any, messages: list) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a whole conversation; labels are -100 except on assistant turns.

    Raises:
        ValueError: the tokenizer has no chat template, or its template renders a conversation's beginning
            differently once more turns follow (then turns cannot be located by prefix).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template; set tokenizer.chat_template (e.g. the teacher's) before "
            "tokenizing chat data."
        )
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_render(tokenizer, messages[:turn], generation_prompt=True))
        through = _render(tokenizer, messages[: turn + 1], generation_prompt=False)
        if ids[: len(through)] != through:
            raise ValueError(
                "The chat template renders the start of a conversation differently when later turns follow, so "
                "assistant turns cannot be located; use a template that renders turns independently."
            )
        labels[start : len(through)] = ids[start : len(through)]
    return ids, labels


def _has_answer(messages: list) -> bool:
    """True when some assistant turn has text; ValueError for content that is not a string."""
    for message in messages:
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"Chat content must be a string, got {type(content).__name__}: {str(content)[:80]!r}.")
    return any(m.get("role") == "assistant" and (m.get("content") or "").strip() for m in messages)


def tokenize_chat(
    data: datasets.Dataset,
    tokenizer: Any,
    *,
    max_length: int = 1024,
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_prompt: str | None = None,
) -> ChatTokenization:
    """Tokenize chat data for causal-LM distillation (labels on assistant tokens only).

    ``data`` has a ``messages`` column (lists of ``{"role", "content"}``) or ``prompt_column`` / ``response_column``
    (one user turn, one assistant turn each). Conversations longer than ``max_length`` tokens are cut there; those
    left without any assistant token are dropped. Both counts are returned and logged.

    Raises:
        ValueError: missing columns, no chat template, ``max_length`` < 2, no conversation left with an assistant
            token.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}.")
    if len(data) == 0:
        raise ValueError("tokenize_chat got an empty dataset: pass rows with prompt/response columns or messages.")
    options = {"prompt_column": prompt_column, "response_column": response_column, "system_prompt": system_prompt}
    conversation(data[0], **options)  # column errors before the whole set is mapped
    answered = data.filter(lambda row: _has_answer(conversation(row, **options)), desc="Dropping unanswered")
    unanswered = len(data) - len(answered)
    if unanswered:
        # Their only label would be the end-of-turn token: the student would learn to stop at once.
        logger.warning(
            "%d of %d rows have no assistant answer (empty or missing) and were dropped.", unanswered, len(data)
        )
    if not len(answered):
        raise ValueError(
            f"None of the {len(data)} rows has a non-empty assistant answer ({response_column!r} / messages)."
        )
    data = answered

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        ids, labels = assistant_labels(tokenizer, conversation(row, **options))
        return {
            "input_ids": ids[:max_length],
            "attention_mask": [1] * min(len(ids), max_length),
            "labels": labels[:max_length],
            "truncated": len(ids) > max_length,
        }

    encoded = data.map(encode, remove_columns=data.column_names, desc="Applying the chat template")
    truncated = sum(encoded["truncated"])
    kept = encoded.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]), desc="Dropping empty")
    dropped = len(encoded) - len(kept)
    if truncated:
        logger.warning(
            "%d of %d conversations are longer than max_length=%d tokens and were cut; %d lost every assistant "
            "token and were dropped.",
            truncated,
            len(encoded),
            max_length,
            dropped,
        )
    if len(encoded) and not len(kept):
        raise ValueError(
            f"Every one of the {len(encoded)} conversations lost all its assistant tokens at max_length={max_length} "
            "(the prompt alone fills it, or the responses are empty): raise max_length."
        )
    return ChatTokenization(kept.remove_columns("truncated"), truncated, dropped + unanswered)


def training_tokens_per_s(metrics: dict[str, Any], train: datasets.Dataset) -> float:
    """Training throughput in tokens/s: Trainer's ``train_samples_per_second`` times the mean unpadded length of a
    row of ``train`` (its ``input_ids``)."""
    mean_length = sum(len(ids) for ids in train["input_ids"]) / max(len(train), 1)
    return metrics.get("train_samples_per_second", 0.0) * mean_length
