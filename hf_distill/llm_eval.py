"""Evaluating a chat LM on prompt/response rows: ROUGE-L of its greedy answers and the teacher's perplexity of them.

The protocol of MiniLLM (Gu et al. 2024) and GKD (Agarwal et al. 2024) on Self-Instruct and similar sets: greedy
responses to every prompt (through the chat template, batched, :func:`hf_distill.generation.generate_responses`),
ROUGE-L F1 against the reference (Google's ``rouge-score`` package with its Porter stemmer, as Natural
Instructions and MiniLLM score, ×100, mean over rows), and optionally the teacher's perplexity of the student's
answers: how likely the teacher finds what the student says (labels on the response tokens only, token-weighted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from hf_distill.chat import tokenize_chat
from hf_distill.depth import calibration_nll
from hf_distill.generation import generate_responses
from hf_distill.pruning import calibration_batches


@dataclass
class GenerationEval:
    """What :func:`evaluate_generation` measured; ``to_dict`` gives the JSON-ready form."""

    rouge_l: float  # mean ROUGE-L F1 × 100 against the references
    teacher_perplexity: float | None  # exp(mean teacher NLL per response token); None without a teacher
    num_rows: int
    samples: list[dict[str, str]]  # the first rows: prompt, reference, response
    responses: list[str] = field(repr=False)  # every generated response, in row order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 × 100 of aligned prediction/reference pairs (``rouge-score``, stemmed; English tokenizer:
    lower-cased alphanumeric words, so text without any scores 0).

    Raises:
        ValueError: lists of different lengths or empty; ``rouge-score`` not installed.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"rouge_l needs as many predictions as references (at least one); got {len(predictions)} and "
            f"{len(references)}."
        )
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ValueError("ROUGE-L needs the rouge-score package: pip install rouge-score (hf-distill[llm]).") from err
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return 100 * sum(scores) / len(scores)


def response_perplexity(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
) -> float:
    """``model``'s perplexity of the assistant turns of ``conversations`` (chat template, labels on the assistant
    tokens and end-of-turn marker only): ``exp`` of the mean NLL per scored token over all conversations."""
    data = tokenize_chat(datasets.Dataset.from_dict({"messages": conversations}), tokenizer, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = calibration_batches(data.dataset, model, pad or 0, batch_size, len(data.dataset), labels=True)
    was_training = model.training
    model.eval()
    try:
        return math.exp(calibration_nll(model, batches))
    finally:
        model.train(was_training)


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    rows: datasets.Dataset | list[dict[str, Any]],
    teacher: Any = None,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    num_samples: int = 3,
) -> GenerationEval:
    """Greedy responses of ``model`` to ``rows`` scored by ROUGE-L against ``response_column`` and, with a
    ``teacher`` (same tokenizer), by the teacher's perplexity of them. A progress bar with ETA shows generation.

    Raises:
        ValueError: no rows, missing columns, a tokenizer without a chat template, non-positive sizes.
    """
    if not isinstance(rows, datasets.Dataset):
        rows = datasets.Dataset.from_list(list(rows))
    if len(rows) == 0:
        raise ValueError("No rows to evaluate: the dataset is empty.")
    missing = [c for c in (prompt_column, response_column) if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"evaluate_generation needs columns {prompt_column!r} and {response_column!r} (missing: {missing}; "
            f"columns: {rows.column_names}); set prompt_column= / response_column=."
        )
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    prompts = rows.select_columns([prompt_column])
    generated = generate_responses(
        model,
        tokenizer,
        prompts,
        prompt_column=prompt_column,
        system_prompt=system_prompt,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc="Generating for evaluation",
    )
    responses, references = list(generated["response"]), [str(r) for r in rows[response_column]]
    perplexity = None
    if teacher is not None:
        perplexity = response_perplexity(teacher, tokenizer, list(generated["messages"]), batch_size=batch_size)
    samples = [
        {"prompt": p, "reference": r, "response": g}
        for p, r, g in list(zip(list(generated["prompt"]), references, responses, strict=True))[:num_samples]
    ]
    return GenerationEval(rouge_l(responses, references), perplexity, len(rows), samples, responses)
