"""Checks of an offline teacher cache against the student, run before training (and for datasets given later).

Every dataset trained or evaluated on must hold the cache columns; the cache's teacher must fit the student by the
one class-count rule (:func:`~hf_distill.vocabulary.match_classes`), and a partial cache's leftover mass must have
been built at the training temperature. Each error names the problem and the fix.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hf_distill.cache import (
    CACHE_NUM_CLASSES,
    CACHE_TEMPERATURE,
    REST_MASS,
    TOPK_INDICES,
    TOPK_LOGITS,
    column_max,
    column_values,
    dataset_columns,
    has_cached_logits,
)
from hf_distill.config import DistillationConfig
from hf_distill.tasks import Task
from hf_distill.vocabulary import ClassMatch, match_classes, output_classes, text_tokenizer

logger = logging.getLogger(__name__)


def validate_cached_setup(
    student: nn.Module,
    args: DistillationConfig,
    task: Task,
    train_dataset: Any,
    eval_dataset: Any,
    processing_class: Any,
) -> ClassMatch | None:
    named = _named_datasets(train_dataset, eval_dataset)
    for name, dataset in (named or {"train dataset": None}).items():
        columns = dataset_columns(dataset)
        if dataset is None or (columns is not None and not has_cached_logits(columns)):
            raise ValueError(_missing_cache_message(name, columns))
    if args.hidden_loss_weight > 0 or args.attention_loss_weight > 0:
        raise ValueError(
            "Hidden-state and attention matching need the teacher's activations, which the logit cache does not "
            "hold. Pass teacher= (online distillation) or set hidden_loss_weight=0 and attention_loss_weight=0."
        )
    if args.kd_loss == "mse":
        raise ValueError(
            "kd_loss='mse' compares raw logits; a top-k cache keeps only probabilities. Use a "
            "divergence such as 'forward_kl' with cached logits, or pass teacher=."
        )
    tokenizer = text_tokenizer(processing_class)
    size = len(tokenizer) if tokenizer is not None else None
    matches = {
        name: validate_cached_dataset(student, args, task, dataset, name, size) for name, dataset in named.items()
    }
    return matches.get("train dataset")


def _missing_cache_message(name: str, columns: list[str] | None) -> str:
    article = "an" if name[0] in "aeiou" else "a"
    return (
        f"teacher=None needs {article} {name} with cached teacher logits (columns teacher_topk_logits, "
        "teacher_topk_indices, teacher_rest_mass, teacher_temperature): every dataset it trains or evaluates on; "
        f"found {columns}. Run "
        "hf_distill.cache_teacher_logits(teacher, dataset) on it first, or pass teacher=."
    )


def _named_datasets(train_dataset: Any, eval_dataset: Any) -> dict[str, Any]:
    """The train set and every eval set (``eval_dataset`` may be a dict of them), by the name errors use."""
    named = {"train dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        named |= {f"eval dataset {key!r}": value for key, value in eval_dataset.items()}
    else:
        named["eval dataset"] = eval_dataset
    return {name: dataset for name, dataset in named.items() if dataset is not None}


def validate_cached_dataset(
    student: nn.Module,
    args: DistillationConfig,
    task: Task,
    dataset: Any,
    name: str,
    tokenizer_size: int | None = None,
) -> ClassMatch | None:
    """Check a cached dataset against the student and the training temperature, over all rows.

    The teacher's class count must fit the student's by the rule of the online path
    (:func:`~hf_distill.vocabulary.match_classes`, with ``tokenizer_size`` the data's ``len(tokenizer)``); caches
    written without it (older hf_distill) must at least have indices below the student's class count. Rows of a
    partial cache with leftover mass must share the training temperature. Returns the classes compared, or None
    for datasets that cannot be read up front.

    Raises:
        ValueError: a check fails; the message names ``name`` and the fix.
    """
    columns = dataset_columns(dataset)
    if columns is not None and not has_cached_logits(columns):
        raise ValueError(_missing_cache_message(name, columns))
    if columns is None or not hasattr(dataset, "__len__") or not len(dataset):
        return None  # iterable or empty datasets: the per-batch checks of teacher_logits_from_cache still apply
    first = dataset[0][TOPK_LOGITS]
    cached_k = len(first) if task is Task.SEQUENCE_CLASSIFICATION else len(first[0])
    classes = output_classes(student, task)
    if CACHE_NUM_CLASSES in columns:
        counts = column_values(dataset, CACHE_NUM_CLASSES)
        if len(counts) > 1:
            raise ValueError(
                f"The {name} mixes caches from teachers with {sorted(counts)} classes; rebuild it with one teacher."
            )
        match = match_classes(task, classes, int(counts.pop()), tokenizer_size)
    else:
        largest = column_max(dataset, TOPK_INDICES)
        if cached_k > classes or largest >= classes:
            raise ValueError(
                f"The {name} holds teacher class indices up to {int(largest)} ({cached_k} per position) but the "
                f"student has only {classes} classes: the cache comes from a teacher with another label set or "
                "vocabulary. Rebuild it with this student's teacher."
            )
        logger.warning(
            "The %s has no %s column (a cache written by an older hf_distill): its class indices fit the student's "
            "%d classes, but a teacher with fewer classes cannot be ruled out. Rebuild it with cache_teacher_logits "
            "to have the class count checked.",
            name,
            CACHE_NUM_CLASSES,
            classes,
        )
        match = ClassMatch(classes, classes, classes)
    _validate_cached_temperature(args, dataset, name, cached_k, match.teacher)
    return match


def _validate_cached_temperature(
    args: DistillationConfig, dataset: Any, name: str, cached_k: int, classes: int
) -> None:
    if cached_k >= classes:
        return  # a full cache holds raw logits: right at every temperature
    temperatures = column_values(dataset, CACHE_TEMPERATURE)
    if all(abs(t - args.temperature) <= 1e-6 for t in temperatures) or column_max(dataset, REST_MASS) <= 0:
        return  # no leftover mass: the top-k distribution is right at every temperature
    if len(temperatures) > 1:
        raise ValueError(
            f"The {name} holds top-{cached_k} teacher caches built at temperatures {sorted(temperatures)}; their "
            "leftover mass only holds at the temperature each row was built at, and one batch trains at one. "
            f"Rebuild the whole cache with cache_teacher_logits(..., temperature={args.temperature})."
        )
    built = temperatures.pop()
    raise ValueError(
        f"The {name}'s teacher cache was built at temperature {built} with top_k={cached_k} < {classes} classes, "
        f"so its leftover mass only holds at that temperature, but training uses temperature={args.temperature}. "
        f"Set temperature={built} or rebuild the cache with cache_teacher_logits(..., "
        f"temperature={args.temperature})."
    )


__all__ = ["validate_cached_dataset", "validate_cached_setup"]
