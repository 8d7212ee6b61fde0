"""Checks run before the first training step: each names the problem and the fix."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hf_distill.cache import TOPK_LOGITS, dataset_columns, has_cached_logits
from hf_distill.cache_checks import validate_cached_setup
from hf_distill.config import DistillationConfig
from hf_distill.forward import accepted_inputs
from hf_distill.losses import LOGIT_LOSSES, MULTI_LABEL, REGRESSION, SINGLE_LABEL
from hf_distill.prompts import check_peft_combination, num_virtual_tokens
from hf_distill.tasks import Task, infer_task, unwrap_model
from hf_distill.vocabulary import (
    ClassMatch,
    describe,
    output_classes,
    teacher_class_match,
)

LABEL_COLUMNS = ("labels", "label", "label_ids")
logger = logging.getLogger(__name__)


def validate_setup(
    student: nn.Module,
    teacher: nn.Module | None,
    args: DistillationConfig,
    task: Task,
    train_dataset: Any = None,
    processing_class: Any = None,
    eval_dataset: Any = None,
    data_collator: Any = None,
) -> ClassMatch | None:
    """Every check that can run before training: PEFT combinations, teacher or cache against the student, labels.

    ``eval_dataset`` may be one dataset or a dict of them; with ``teacher=None`` each must hold a valid cache.
    Returns which classes the KD loss compares (:func:`~hf_distill.vocabulary.match_classes`; logged once when
    padded vocabularies leave some out), or None when a cache cannot be read up front.

    Raises:
        ValueError: the first failing check, naming the problem and the fix.
    """
    columns = dataset_columns(train_dataset)
    check_peft_combination(student)
    if num_virtual_tokens(student) and args.attention_loss_weight > 0:
        raise ValueError(
            "Attention matching cannot align a prompt-learning student's virtual positions with the "
            "teacher's attention maps; set attention_loss_weight=0 (hidden-state matching works)."
        )
    if args.teacher_prompt is not None:
        _validate_teacher_prompt(args, task, teacher, processing_class)
    if (args.lmbda > 0 or args.seq_kd) and (task is not Task.CAUSAL_LM or teacher is None):
        raise ValueError(
            f"lmbda={args.lmbda} / seq_kd={args.seq_kd} generate responses during training: they need a causal-LM "
            f"student (this one solves {task.value}) and an online teacher (teacher=...), not a logit cache."
        )
    if teacher is None:
        match = validate_cached_setup(student, args, task, train_dataset, eval_dataset, processing_class)
    else:
        match = _validate_teacher(student, teacher, args, task, processing_class)
    label_columns = (*LABEL_COLUMNS, *(args.label_names or []))
    if args.alpha < 1 and columns is not None and not any(c in columns for c in label_columns):
        if not collator_adds_labels(student, args, train_dataset, data_collator):
            raise ValueError(
                f"alpha={args.alpha} gives the hard-label loss weight {1 - args.alpha:.2f}, but the train dataset "
                f"has no label column (columns: {columns}) and the data collator adds none. Add a 'labels' column, "
                "use a collator that makes them (DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal "
                "LM), or set alpha=1.0 to learn from the teacher only."
            )
    _validate_teacher_top_k(args, teacher, match)
    if match is not None and match.padded:
        logger.warning(describe(match))
    return match


def _validate_teacher_top_k(args: DistillationConfig, teacher: nn.Module | None, match: ClassMatch | None) -> None:
    k = args.teacher_top_k
    if k is None:
        return
    if teacher is None:
        raise ValueError(
            f"teacher_top_k={k} summarises an online teacher's logits; a logit cache holds its own top-k "
            "(cache_teacher_logits(..., top_k=...)). Unset teacher_top_k, or pass teacher=."
        )
    if args.kd_loss in LOGIT_LOSSES:
        raise ValueError(
            f"teacher_top_k={k} keeps probabilities, but kd_loss={args.kd_loss!r} compares raw logits. Use a "
            "divergence such as 'forward_kl', or unset teacher_top_k."
        )
    if match is not None and k > match.compared:
        raise ValueError(
            f"teacher_top_k={k}, but the KD loss compares {match.compared} classes. Use at most {match.compared}, "
            "or None to keep every logit."
        )


def collator_adds_labels(student: nn.Module, args: DistillationConfig, dataset: Any, data_collator: Any) -> bool:
    """True when ``data_collator`` turns the dataset's first example into a batch with ``labels``.

    The example is collated as the Trainer will (columns the student does not take are removed first, unless
    ``remove_unused_columns=False``): one example, so the check is cheap, and it sees what the collator really
    does (``DataCollatorForLanguageModeling(mlm=False)`` copies ``input_ids``), whatever its class.

    Raises:
        ValueError: the collator fails on the example.
    """
    if data_collator is None or not hasattr(dataset, "__getitem__"):
        return False
    try:
        example = dict(dataset[0])
    except Exception:  # iterable or empty datasets: the first batch's hard_loss check still applies
        return False
    if args.remove_unused_columns:
        kept = accepted_inputs(student) | set(LABEL_COLUMNS)
        example = {k: v for k, v in example.items() if k in kept}
    try:
        batch = data_collator([example])
    except Exception as err:  # any collator's own error: say which check ran into it
        raise ValueError(
            f"The data collator {type(data_collator).__name__} failed on the train dataset's first example (collated "
            f"before training to see whether it adds labels): {type(err).__name__}: {err}"
        ) from err
    return hasattr(batch, "get") and batch.get("labels") is not None


def _validate_teacher_prompt(args: DistillationConfig, task: Task, teacher: Any, processing_class: Any) -> None:
    if teacher is None:
        raise ValueError("teacher_prompt needs an online teacher (teacher=...): the logit cache holds no prompt.")
    if task is Task.TOKEN_CLASSIFICATION:
        raise ValueError(
            "teacher_prompt supports sequence classification and causal LM; token labels would have to "
            "be shifted past the prompt."
        )
    if processing_class is None or not callable(processing_class):
        raise ValueError("teacher_prompt needs the tokenizer: pass processing_class=tokenizer to DistillationTrainer.")
    if args.hidden_loss_weight > 0 or args.attention_loss_weight > 0:
        raise ValueError(
            "teacher_prompt distils outputs only: set hidden_loss_weight=0 and attention_loss_weight=0 "
            "(the teacher's hidden states include the prompt positions)."
        )


def _validate_teacher(
    student: nn.Module, teacher: nn.Module, args: DistillationConfig, task: Task, processing_class: Any
) -> ClassMatch:
    if teacher is student:
        raise ValueError(
            "teacher and model are the same object: the student would distil from itself. Pass a "
            "separate (fine-tuned) teacher, e.g. loaded again with from_pretrained."
        )
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    if any(id(p) in trainable for p in teacher.parameters()):
        raise ValueError(
            "The teacher shares trainable weights with the student (e.g. get_peft_model wrapped the teacher itself, "
            "whose classifier then trains). Build the student from a copy: get_peft_model(copy.deepcopy(teacher), ...)."
        )
    if any(p.is_meta for p in teacher.parameters()):
        raise ValueError(
            "The teacher's weights are on the meta device (loaded without weights, e.g. under init_empty_weights). "
            "Load it with real weights: AutoModel...from_pretrained(path) without device_map='meta'."
        )
    teacher_task = infer_task(teacher)
    if teacher_task is not task:
        raise ValueError(
            f"The teacher solves {teacher_task.value} but the student {task.value}; load the teacher "
            f"with the student's Auto class."
        )
    match = teacher_class_match(student, teacher, task, processing_class)
    if task is not Task.CAUSAL_LM:
        s_map = getattr(unwrap_model(student).config, "label2id", None)
        t_map = getattr(unwrap_model(teacher).config, "label2id", None)
        if s_map and t_map and {str(k): int(v) for k, v in s_map.items()} != {str(k): int(v) for k, v in t_map.items()}:
            raise ValueError(
                f"Teacher label2id {t_map} differs from the student's {s_map}: the same class index must mean the "
                "same label. Give the student the teacher's label2id/id2label."
            )
    if args.layer_map is not None:
        s_layers = unwrap_model(student).config.num_hidden_layers
        t_layers = unwrap_model(teacher).config.num_hidden_layers
        for s, t in args.layer_map.items():
            if not 0 <= s <= s_layers or not 0 <= t <= t_layers:
                raise ValueError(
                    f"layer_map entry {s} -> {t} is out of range: student hidden states are 0..{s_layers} and "
                    f"teacher hidden states 0..{t_layers} (0 is the embedding output)."
                )
    return match


def _first_label(dataset: Any) -> Any:
    """The label of the dataset's first example (None when there is none or it cannot be read cheaply)."""
    columns = dataset_columns(dataset)
    name = next((c for c in LABEL_COLUMNS if columns and c in columns), None)
    if name is None:
        return None
    try:
        return dataset[0][name]
    except Exception:  # iterable datasets: checked on the first batch instead
        return None


def resolve_problem_type(student: nn.Module, teacher: nn.Module | None, task: Task, train_dataset: Any = None) -> str:
    """The head's problem type, decided as transformers' sequence-classification heads do.

    ``config.problem_type`` of the student (or the teacher) when set; otherwise ``regression`` for one output,
    ``multi_label_classification`` for list-valued (multi-hot) labels and ``single_label_classification`` else.
    Token classification and causal LM are single-label.

    Raises:
        ValueError: teacher and student declare different problem types, or the labels do not fit the declared one.
    """
    if task is not Task.SEQUENCE_CLASSIFICATION:
        return SINGLE_LABEL
    declared = {
        who: getattr(unwrap_model(model).config, "problem_type", None)
        for who, model in (("student", student), ("teacher", teacher))
        if model is not None
    }
    if declared.get("teacher") and declared.get("student") and declared["teacher"] != declared["student"]:
        raise ValueError(
            f"The teacher's problem_type is {declared['teacher']!r} but the student's {declared['student']!r}: both "
            "heads must read their outputs the same way. Give the student the teacher's config.problem_type."
        )
    label = _first_label(train_dataset)
    problem = declared.get("student") or declared.get("teacher")
    if problem is None:
        if output_classes(student, task) == 1:
            problem = REGRESSION
        else:
            problem = MULTI_LABEL if isinstance(label, (list, tuple)) else SINGLE_LABEL
    if label is not None and problem != REGRESSION and isinstance(label, (list, tuple)) != (problem == MULTI_LABEL):
        raise ValueError(
            f"problem_type={problem!r} but the first training label is {label!r}: multi-label classification needs a "
            "multi-hot list of num_labels floats per example, single-label classification one class index. Fix the "
            "labels or the model config's problem_type."
        )
    return problem


def validate_loss_setup(
    student: nn.Module,
    args: DistillationConfig,
    task: Task,
    problem_type: str,
    train_dataset: Any = None,
    compute_loss_func: Any = None,
) -> None:
    """Reject loss setups that would silently compute something else than asked.

    Raises:
        ValueError: a softmax divergence on a single-output / regression head, label smoothing without a softmax,
            a partial logit cache for a multi-label head, or a Trainer loss option the distillation loss replaces.
    """
    classes = output_classes(student, task)
    uses_kd, uses_hard = args.alpha > 0, args.alpha < 1
    if uses_kd and args.kd_loss not in LOGIT_LOSSES and (problem_type == REGRESSION or classes == 1):
        raise ValueError(
            f"kd_loss={args.kd_loss!r} compares softmax distributions, but this head is a regression head "
            f"(problem_type={problem_type!r}, {classes} output(s)): a softmax over one output is always 1, so the loss "
            "is always 0. Use kd_loss='mse' (the teacher's outputs become regression targets; it needs an online "
            "teacher)."
        )
    if problem_type == SINGLE_LABEL and classes == 1 and uses_hard:
        raise ValueError(
            "problem_type='single_label_classification' with num_labels=1: cross-entropy over one class is always 0. "
            "Use num_labels=2 or problem_type='regression'."
        )
    if args.label_smoothing_factor:
        if not uses_hard:
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} smooths the hard-label loss, which alpha=1.0 "
                "switches off. Set label_smoothing_factor=0, or alpha < 1."
            )
        if problem_type != SINGLE_LABEL:
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} smooths a softmax over classes; a "
                f"{problem_type} head has none (Trainer drops it for multi-label). Set label_smoothing_factor=0."
            )
    if problem_type == MULTI_LABEL and uses_kd and args.teacher_top_k is not None:
        raise ValueError(
            f"teacher_top_k={args.teacher_top_k}: a multi-label head needs every class's logit (each is its own "
            "sigmoid). Unset teacher_top_k."
        )
    columns = dataset_columns(train_dataset)
    if problem_type == MULTI_LABEL and uses_kd and columns is not None and has_cached_logits(columns):
        cached_k = len(train_dataset[0][TOPK_LOGITS])
        if cached_k != classes:
            raise ValueError(
                f"A multi-label head needs every class's logit (each is its own sigmoid), but the cache holds the top "
                f"{cached_k} of {classes}. Rebuild it with cache_teacher_logits(..., top_k=None)."
            )
    _validate_trainer_options(args, compute_loss_func)


def _validate_trainer_options(args: DistillationConfig, compute_loss_func: Any) -> None:
    """Trainer options that act inside Trainer.compute_loss, which DistillationTrainer replaces."""
    if compute_loss_func is not None:
        raise ValueError(
            "DistillationTrainer computes its own loss (alpha·KD + (1 − alpha)·hard loss + layer terms), so "
            "compute_loss_func would be ignored. To change the hard-label loss, subclass DistillationTrainer and "
            "override hard_loss(logits, labels, mask), which returns one value per loss position."
        )
    if args.label_names not in (None, ["labels"]):
        raise ValueError(
            f"label_names={args.label_names}: DistillationTrainer reads the labels from the 'labels' field. Rename "
            "the column to 'labels' and leave label_names unset."
        )
    if args.use_liger_kernel:
        raise ValueError(
            "use_liger_kernel=True: Liger's fused losses live inside the model's forward with labels, which "
            "DistillationTrainer never passes (it needs the logits for KD). Set use_liger_kernel=False."
        )
    config = args.parallelism_config
    sizes = {name: getattr(config, name, 1) or 1 for name in ("tp_size", "cp_size", "sp_size")} if config else {}
    if any(size > 1 for size in sizes.values()):
        raise ValueError(
            f"parallelism_config {sizes}: tensor, context and sequence parallelism split or replicate the batch "
            "across ranks, which the distillation loss does not account for. Use data parallelism (DDP/FSDP)."
        )
