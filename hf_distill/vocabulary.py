"""Which classes the KD loss compares: one rule for the online teacher and the offline cache.

Equal class counts compare every class. A causal-LM teacher and student may also differ in embedding size while
sharing one tokenizer: models pad their embedding matrices to a multiple of 64 or 128 (Qwen2.5's 151,936 and
152,064 rows for one 151,665-token tokenizer), and the padding rows are never a token. Then the first
``len(tokenizer)`` logits (the tokenizer's real tokens) are compared, which both heads must cover. Different
tokenizers map one id to different tokens, so comparing logits id by id is meaningless: they are refused (cross-
tokenizer distillation, which aligns vocabularies, is not supported).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hf_distill.loading import load_tokenizer
from hf_distill.tasks import Task, unwrap_model


@dataclass(frozen=True)
class ClassMatch:
    """The teacher's and the student's class counts and how many (the first ``compared``) enter the KD loss."""

    student: int
    teacher: int
    compared: int

    @property
    def padded(self) -> bool:
        """True when some logits of one side are left out (padded vocabularies)."""
        return self.compared < max(self.student, self.teacher)


def output_classes(model: nn.Module, task: Task) -> int:
    """The model's output size: its LM head's rows for causal LM (the padded vocabulary), else ``num_labels``."""
    base = unwrap_model(model)
    if task is Task.CAUSAL_LM:
        head = base.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(base.config.vocab_size)
    return int(base.config.num_labels)


def match_classes(task: Task, student_classes: int, teacher_classes: int, tokenizer_size: int | None) -> ClassMatch:
    """The classes KD compares, or an error naming the fix; ``tokenizer_size`` is ``len(tokenizer)`` when known.

    Raises:
        ValueError: different label counts; different vocabulary sizes without a known tokenizer, or with one that
            has tokens beyond the smaller model's embedding rows.
    """
    if student_classes == teacher_classes:
        return ClassMatch(student_classes, teacher_classes, student_classes)
    if task is not Task.CAUSAL_LM:
        raise ValueError(
            f"Teacher has {teacher_classes} labels but the student {student_classes}: build the student with the "
            "teacher's num_labels, id2label and label2id (create_student copies them)."
        )
    smaller = min(student_classes, teacher_classes)
    if tokenizer_size is None:
        raise ValueError(
            f"Teacher vocabulary size {teacher_classes} differs from the student's {student_classes}: token-level KD "
            "needs one vocabulary. If both use one tokenizer (padded embedding matrices), pass it as "
            "processing_class=tokenizer so that the tokenizer's tokens are compared; otherwise use a student with "
            "the teacher's tokenizer (create_student does), or resize the student's embeddings with "
            "model.resize_token_embeddings(teacher_vocab_size)."
        )
    if tokenizer_size > smaller:
        raise ValueError(
            f"Teacher vocabulary size {teacher_classes} differs from the student's {student_classes}, and the "
            f"tokenizer has {tokenizer_size} tokens, more than the {smaller} embedding rows of the smaller model: its "
            f"last ids have no logit there. Resize that model with model.resize_token_embeddings({tokenizer_size}) "
            "(or to the other model's size)."
        )
    return ClassMatch(student_classes, teacher_classes, tokenizer_size)


def describe(match: ClassMatch) -> str:
    """The log line for a padded-vocabulary pair."""
    return (
        f"Teacher and student output {match.teacher} and {match.student} logits (padded vocabularies of one "
        f"tokenizer): the KD loss compares the first {match.compared}, the tokenizer's tokens."
    )


def saved_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved next to a model loaded from a local folder (``name_or_path``), else None."""
    path = getattr(unwrap_model(model), "name_or_path", None)
    return load_tokenizer(str(path)) if path and Path(str(path)).is_dir() else None


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer inside a processing class (a tokenizer itself, or a processor's ``tokenizer``), else None."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return tokenizer if callable(getattr(tokenizer, "get_vocab", None)) else None


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Teacher and student must read ids as the same tokens (one may only append tokens, e.g. a pad token).

    Raises:
        ValueError: a token has different ids in the two tokenizers, naming one such token.
    """
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher:
        return
    shorter, longer = (student, teacher) if len(student) <= len(teacher) else (teacher, student)
    conflict = next((t for t, i in shorter.items() if longer.get(t) != i), None)
    appended = conflict is None and all(i >= len(shorter) for t, i in longer.items() if t not in shorter)
    if appended:
        return
    if conflict is None:
        conflict = next(t for t, i in longer.items() if t not in shorter and i < len(shorter))
    raise ValueError(
        f"The teacher's tokenizer ({len(teacher)} tokens, saved with the teacher) and the student's processing_class "
        f"({len(student)} tokens) are different tokenizers: {conflict!r} is id {student.get(conflict)} for the "
        f"student and {teacher.get(conflict)} for the teacher. Token-level KD compares logits id by id, so both "
        "must use one tokenizer (cross-tokenizer distillation is not supported yet): build the student from the "
        "teacher (create_student keeps its tokenizer) and tokenize the data with the teacher's tokenizer."
    )


def teacher_class_match(student: nn.Module, teacher: nn.Module, task: Task, processing_class: Any) -> ClassMatch:
    """The classes compared with an online teacher; its saved tokenizer must be the data's (when both are known).

    ``processing_class`` (the trainer's) tokenized the data; the teacher's tokenizer is the one saved in the folder
    it was loaded from. Either one's ``len`` decides a padded-vocabulary pair (the data's first).

    Raises:
        ValueError: different tokenizers, or class counts :func:`match_classes` refuses.
    """
    tokenizer, teacher_tokenizer = text_tokenizer(processing_class), saved_tokenizer(teacher)
    if tokenizer is not None and teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    known = tokenizer if tokenizer is not None else teacher_tokenizer
    size = len(known) if known is not None else None
    return match_classes(task, output_classes(student, task), output_classes(teacher, task), size)


__all__ = [
    "ClassMatch",
    "check_same_tokenizer",
    "match_classes",
    "output_classes",
    "saved_tokenizer",
    "teacher_class_match",
    "text_tokenizer",
]
