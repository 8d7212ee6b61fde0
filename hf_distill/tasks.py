"""Which task a model solves, which logit positions take part in the loss, and what the attention mask says.

The attention mask is the one record of which positions hold real tokens: the last attended position (the one a
decoder classifier scores) and each token's position id (what an absolute-position decoder such as GPT-2 must see
for a left-padded row to equal its right-padded self) both come from it, here, for the trainer, the cache and the
exporters alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

IGNORE_INDEX = -100


class Task(str, Enum):
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    CAUSAL_LM = "causal-lm"


AUTO_CLASSES = {
    Task.SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
    Task.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    Task.CAUSAL_LM: AutoModelForCausalLM,
}
_CLASS_NAMES = {
    Task.SEQUENCE_CLASSIFICATION: set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()),
    Task.TOKEN_CLASSIFICATION: set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values()),
    Task.CAUSAL_LM: set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_SUFFIXES = (
    ("ForSequenceClassification", Task.SEQUENCE_CLASSIFICATION),
    ("ForTokenClassification", Task.TOKEN_CLASSIFICATION),
    ("ForCausalLM", Task.CAUSAL_LM),
    ("LMHeadModel", Task.CAUSAL_LM),
)


def task_from_architecture(name: str, purpose: str = "distil") -> Task:
    """Task of a transformers class name (``BertForSequenceClassification``, ``GPT2LMHeadModel``, ...).

    The Auto* registries decide first, the class-name suffix second.

    Raises:
        ValueError: the class solves none of the supported tasks.
    """
    for task, names in _CLASS_NAMES.items():
        if name in names:
            return task
    for suffix, task in _SUFFIXES:
        if name.endswith(suffix):
            return task
    raise ValueError(
        f"Cannot {purpose} {name}: hf_distill cannot tell which task it solves. Supported: sequence classification, "
        "token classification and causal LM models (*ForSequenceClassification / *ForTokenClassification / "
        "*ForCausalLM, loaded with the matching AutoModelFor... class)."
    )


def infer_task(model: nn.Module) -> Task:
    """Task of a (possibly DDP/PEFT-wrapped) transformers model, from its class name."""
    return task_from_architecture(type(unwrap_model(model)).__name__)


def is_decoder_only(model: nn.Module) -> bool:
    """True for decoder-only transformers (GPT-2, Llama, Qwen2, Mistral, ...), whatever their head.

    They attend causally and number positions from the first column of the batch, so padding on the left shifts
    every token unless position ids come from the attention mask. Encoders that also have a causal-LM head (BERT,
    RoBERTa, ...) are not decoder-only: RoBERTa-style models derive their own positions from the padding.
    """
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", "")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def pools_last_token(model: nn.Module) -> bool:
    """True for decoder classifiers (``GPT2ForSequenceClassification``, ``LlamaForSequenceClassification``, ...).

    Their ``score`` head runs on every position and one position per row is kept: the last token. transformers
    finds it from ``input_ids`` and ``pad_token_id``, which fails for ``inputs_embeds`` (soft prompts) and for pad
    ids that are also real tokens; :func:`last_attended_position` finds it from the attention mask.
    """
    base = unwrap_model(model)
    if not is_decoder_only(base) or not isinstance(getattr(base, "score", None), nn.Module):
        return False
    try:
        return infer_task(base) is Task.SEQUENCE_CLASSIFICATION
    except ValueError:  # a head hf_distill does not train (e.g. GPT2DoubleHeadsModel): leave it as it is
        return False


def last_attended_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[batch]`` of the last position whose attention mask is 1 in each row of a ``[batch, seq]`` mask.

    Right padding gives ``length - 1``, left padding ``seq - 1``; a row without any attended position gives 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[batch, seq]`` counting attended positions only (``cumsum − 1``, clamped at 0).

    As transformers' ``generate`` does: a left-padded row's tokens get 0, 1, 2, ... like the same row right-padded;
    padding positions get 0 (left) or repeat the last position (right), and are masked anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class AlignedLogits:
    """Student and teacher logits flattened to the positions that count, plus those positions' labels."""

    student: torch.Tensor  # [N, C]
    teacher: torch.Tensor | None  # [N, C]
    labels: torch.Tensor | None  # [N]
    mask: torch.Tensor  # [N] bool: which of the N positions count (the soft loss covers all of them)
    labelled: torch.Tensor  # [N] bool, within mask: the positions with a label (the hard loss covers these)


def labelled_positions(
    task: Task, labels: torch.Tensor | None, attention_mask: torch.Tensor | None, logits: torch.Tensor
) -> torch.Tensor | None:
    """Boolean mask over the positions of ``logits`` (before flattening) that carry a label: the hard loss's.

    Labels decide when present (-100 marks padding, prompt, sub-word or unlabelled positions); otherwise the
    attention mask. For causal LM, position i predicts token i + 1, so the mask is taken from the shifted labels,
    and position i must itself be attended: with left padding the last pad position would otherwise "predict" the
    first token. None: every example of a sequence-classification batch (no labels, or float labels).
    """
    if task is Task.SEQUENCE_CLASSIFICATION:
        if labels is None:
            return None
        return labels != IGNORE_INDEX if labels.dtype in (torch.long, torch.int) else None
    if task is Task.CAUSAL_LM:
        if labels is not None:
            positions = labels[:, 1:] != IGNORE_INDEX
            return positions if attention_mask is None else positions & attention_mask[:, :-1].bool()
        if attention_mask is not None:
            return (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)[:, 1:]
    if labels is not None:
        return labels != IGNORE_INDEX
    if attention_mask is not None:
        return attention_mask.bool()
    return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)


def loss_positions(
    task: Task, labels: torch.Tensor | None, attention_mask: torch.Tensor | None, logits: torch.Tensor
) -> torch.Tensor | None:
    """Boolean mask over the positions of ``logits`` (before flattening) that enter the losses: the soft loss's.

    :func:`labelled_positions`, plus every position of an *unlabelled example* (KD on unlabelled text: such an
    example takes the soft loss only, so alpha applies per example). An example is unlabelled when its label is -100
    (sequence classification: one label per row) or when all its token labels are -100 (token classification);
    then its attended tokens count. For causal LM -100 marks prompt tokens, not missing labels: a row without a
    single labelled token adds nothing (unlabelled causal-LM text is a row whose labels are its input ids, or a
    dataset without labels at alpha=1).
    """
    labelled = labelled_positions(task, labels, attention_mask, logits)
    if labels is None or labelled is None or task is Task.CAUSAL_LM:
        return labelled
    if task is Task.SEQUENCE_CLASSIFICATION:
        return torch.ones_like(labelled)
    unlabelled_rows = ~labelled.any(-1, keepdim=True)
    attended = attention_mask.bool() if attention_mask is not None else torch.ones_like(labelled)
    return labelled | (unlabelled_rows & attended)


def align_logits(
    task: Task,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> AlignedLogits:
    """Shift (causal LM) and flatten logits so that row i of student, teacher and labels talk about one position."""
    positions = loss_positions(task, labels, attention_mask, student_logits)
    labelled = labelled_positions(task, labels, attention_mask, student_logits)
    if task is Task.SEQUENCE_CLASSIFICATION:
        everyone = torch.ones(student_logits.shape[0], dtype=torch.bool, device=student_logits.device)
        mask = positions if positions is not None else everyone
        return AlignedLogits(student_logits, teacher_logits, labels, mask, labelled if labelled is not None else mask)
    if task is Task.CAUSAL_LM:
        # Position i predicts token i + 1. The logits keep every position (a view) and the last one is masked out,
        # because slicing it off would copy the student's logits (805 MB at 8 x 512 x 49,152 fp32). Labels shift
        # left, -100 at the end. (Measured: the step's peak at alpha < 1 is set by the hard loss's own copies, so
        # this alone does not lower it; BENCHMARKS.md, "KD memory".)
        labels = None if labels is None else nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        positions, labelled = (nn.functional.pad(m, (0, 1), value=False) for m in (positions, labelled))
    num_classes = student_logits.shape[-1]
    return AlignedLogits(
        student=student_logits.reshape(-1, num_classes),
        teacher=None if teacher_logits is None else teacher_logits.reshape(-1, num_classes),
        labels=None if labels is None else labels.reshape(-1),
        mask=positions.reshape(-1),
        labelled=labelled.reshape(-1),
    )
