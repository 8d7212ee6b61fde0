"""Distillation loss maths: pure torch, no Trainer, no transformers.

Every divergence in :data:`KD_LOSSES` takes the student's and the teacher's logits *already divided by the
temperature* and returns one value per position (shape ``logits.shape[:-1]``). :func:`distillation_loss` adds the
temperature, the T² scaling of Hinton et al. (2015) and masking around them. New losses are added with
:func:`register_kd_loss`.

Probability 0 (a ``-inf`` logit, e.g. a teacher that masks classes or vocabulary) is handled exactly: ``0·log 0``
counts as 0, with finite gradients wherever the loss is finite. A KL direction whose second distribution is 0 where
the first is not is infinite (``reverse_kl`` with a student that puts mass where the teacher has none): the value is
``+inf``, never NaN; the mixtures (``jsd``, ``skew_kl``, ``skew_reverse_kl``) and ``tvd`` stay finite, and logit
``mse`` compares only the classes where both logits are finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

KDLossFn = Callable[..., torch.Tensor]
KD_LOSSES: dict[str, KDLossFn] = {}
# Losses that compare raw logits rather than distributions: temperature and T² do not apply to them.
LOGIT_LOSSES: set[str] = set()


def register_kd_loss(name: str, *, on_logits: bool = False) -> Callable[[KDLossFn], KDLossFn]:
    """Decorator adding a per-position divergence ``fn(student_logits, teacher_logits, **params)`` to the registry."""

    def wrap(fn: KDLossFn) -> KDLossFn:
        if name in KD_LOSSES:
            raise ValueError(f"A KD loss named {name!r} is already registered; pick another name.")
        KD_LOSSES[name] = fn
        if on_logits:
            LOGIT_LOSSES.add(name)
        return fn

    return wrap


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probabilities.

    Classes where p is 0 contribute 0 whatever q is (0·log 0 = 0); where p > 0 and q = 0 the result is +inf. The
    selection happens before the product so that no ``0·inf`` NaN reaches the value or the gradient.
    """
    p = log_p.exp()
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * log_ratio).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 − weight_p)·q) in log space, ``-inf`` (with zero gradient) where p and q are both 0."""
    a, b = log_p + math.log(weight_p), log_q + math.log1p(-weight_p)
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    # logaddexp(-inf, -inf) has a NaN gradient: feed it finite stand-ins there and put -inf back afterwards.
    safe = torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0))
    return safe.masked_fill(both_zero, float("-inf"))


@register_kd_loss("forward_kl")
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student): mode-covering, the loss of Hinton et al. and DistilBERT."""
    return _kl(F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1))


@register_kd_loss("reverse_kl")
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM)."""
    return _kl(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1))


@register_kd_loss("jsd")
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, jsd_beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024).

    ``beta·KL(t || m) + (1 − beta)·KL(s || m)`` with ``m = beta·t + (1 − beta)·s``. As in GKD (and TRL), the endpoints
    are defined as the KL directions the divergence tends to: beta=0 is forward KL, beta=1 is reverse KL.
    """
    log_s, log_t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if jsd_beta == 0.0:
        return _kl(log_t, log_s)
    if jsd_beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mixture(log_t, log_s, jsd_beta)
    return jsd_beta * _kl(log_t, log_m) + (1.0 - jsd_beta) * _kl(log_s, log_m)


@register_kd_loss("skew_kl")
def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, skew_lambda: float = 0.1) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(t || λ·t + (1 − λ)·s). λ=0 is forward KL."""
    log_s, log_t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if skew_lambda == 0.0:
        return _kl(log_t, log_s)
    return _kl(log_t, _log_mixture(log_t, log_s, skew_lambda))


@register_kd_loss("skew_reverse_kl")
def skew_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, skew_lambda: float = 0.1
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(s || λ·s + (1 − λ)·t). λ=0 is reverse KL."""
    log_s, log_t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if skew_lambda == 0.0:
        return _kl(log_s, log_t)
    return _kl(log_s, _log_mixture(log_s, log_t, skew_lambda))


@register_kd_loss("tvd")
def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Total variation distance ½·Σ|t − s| (bounded in [0, 1])."""
    return 0.5 * (F.softmax(teacher_logits, -1) - F.softmax(student_logits, -1)).abs().sum(-1)


@register_kd_loss("mse", on_logits=True)
def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits (Ba & Caruana 2014); temperature does not apply.

    Classes where either logit is ±inf (a masked class) are left out of the mean: their squared difference is
    infinite and says nothing about the finite ones. A position without any finite pair gives 0.
    """
    finite = torch.isfinite(student_logits) & torch.isfinite(teacher_logits)
    # Zero the difference before squaring: squaring inf first would leave a NaN gradient behind the selection.
    diff = torch.where(finite, student_logits - teacher_logits, torch.zeros_like(student_logits))
    return diff.pow(2).sum(-1) / finite.sum(-1).clamp_min(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-position ``values`` over positions where ``mask`` is true ("mean", "sum" or "none")."""
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the loss has shape {tuple(values.shape)}.")
        # A selection, not a product: a NaN or inf at a masked position (padding) must not leak into the sum.
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    count = values.numel() if mask is None else mask.sum()
    return total / torch.clamp(torch.as_tensor(count, device=values.device, dtype=values.dtype), min=1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    scale_by_t2: bool = True,
    reduction: str = "mean",
    multi_label: bool = False,
    **params: float,
) -> torch.Tensor:
    """Soft-target loss between student and teacher logits (``[..., num_classes]``).

    Returns the mean over positions where ``mask`` is true (all positions when ``mask`` is None), or the sum /
    per-position values with ``reduction="sum"|"none"``. Distribution losses are computed at ``temperature`` and
    multiplied by T² (``scale_by_t2``) so gradient magnitudes do not shrink as T grows (Hinton et al. 2015).
    ``params`` go to the loss, e.g. ``jsd_beta`` or ``skew_lambda``.

    ``multi_label=True`` (sigmoid heads, ``problem_type="multi_label_classification"``): every class is its own
    yes/no distribution ``sigmoid(logit / T)``; the divergence is taken per class between these Bernoulli
    distributions and averaged over classes, so one position still gives one value (as BCE does).
    """
    if loss not in KD_LOSSES:
        raise ValueError(f"Unknown KD loss {loss!r}. Choose one of {sorted(KD_LOSSES)} or register your own.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ "
            "in shape: the student and the teacher must share the label set / vocabulary."
        )
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.detach().float()
    if loss in LOGIT_LOSSES:
        per_position = KD_LOSSES[loss](student_logits, teacher_logits, **params)
    else:
        if multi_label:
            student_logits, teacher_logits = _bernoulli_logits(student_logits), _bernoulli_logits(teacher_logits)
        per_position = KD_LOSSES[loss](student_logits / temperature, teacher_logits / temperature, **params)
        if multi_label:
            per_position = per_position.mean(-1)  # [..., classes] -> [...]: one value per position, like BCE
        if scale_by_t2:
            per_position = per_position * temperature**2
    return masked_mean(per_position, mask, reduction)


def _bernoulli_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` sigmoid logits -> ``[..., C, 2]`` two-class logits ``[0, x]``: softmax([0, x])[1] = sigmoid(x)."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def check_finite_kd(values: torch.Tensor, kd_loss: str) -> None:
    """Stop before an infinite KD loss turns the weights into NaN (Trainer's logs would silently skip the step).

    Raises:
        ValueError: ``values`` holds +inf, naming the divergences that stay finite.
    """
    if bool(torch.isinf(values).any()):
        raise ValueError(
            f"kd_loss={kd_loss!r} is infinite on this batch: one distribution gives probability 0 (a -inf logit) to a "
            "class where the other gives mass, and KL(p || q) is infinite when q is 0 where p is not (reverse_kl "
            "with a teacher that masks classes). Use 'jsd', 'skew_kl' or 'skew_reverse_kl' (mixtures: always "
            "finite), 'forward_kl' or 'tvd'."
        )


# --- hard-label losses -----------------------------------------------------------------------------------------

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)


def hard_label_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    problem_type: str = SINGLE_LABEL,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-position loss against the ground truth, as transformers' heads compute it; ``logits`` is ``[N, C]``.

    Returns ``[N]``: cross-entropy with ``label_smoothing`` (Trainer's ``label_smoothing_factor``: ``(1 − ε)·CE +
    ε·mean over classes of −log p``) for ``single_label_classification`` (integer labels ``[N]``); binary
    cross-entropy averaged over classes for ``multi_label_classification`` (multi-hot labels ``[N, C]``); squared
    error averaged over outputs for ``regression`` (labels ``[N]`` or ``[N, C]``).

    Raises:
        ValueError: labels whose type or shape does not fit ``problem_type``, or label smoothing without classes.
    """
    logits = logits.float()
    if problem_type == SINGLE_LABEL:
        if labels.is_floating_point() or labels.dim() != 1:
            raise ValueError(
                f"single-label classification needs one integer class per position, got {labels.dtype} labels of "
                f"shape {tuple(labels.shape)}. Multi-hot float labels need problem_type='multi_label_classification'"
                " in the model config."
            )
        return F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)
    if problem_type not in (MULTI_LABEL, REGRESSION):
        raise ValueError(f"Unknown problem_type {problem_type!r}; choose one of {list(PROBLEM_TYPES)}.")
    if label_smoothing:
        raise ValueError(
            f"label_smoothing_factor={label_smoothing} smooths a softmax over classes; {problem_type} has none. "
            "Set label_smoothing_factor=0."
        )
    targets = labels.float().reshape(logits.shape[0], -1)
    if targets.shape != logits.shape:
        raise ValueError(
            f"{problem_type} needs {logits.shape[-1]} target value(s) per example (the head's outputs), got labels of "
            f"shape {tuple(labels.shape)}."
        )
    if problem_type == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
    return (logits - targets).pow(2).mean(-1)


# --- intermediate-layer losses ---------------------------------------------------------------------------------

HiddenLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).mean(-1)


def _hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # DistilBERT's cosine embedding loss: align directions, ignore norms.
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1)


HIDDEN_LOSSES: dict[str, HiddenLossFn] = {"mse": _hidden_mse, "cosine": _hidden_cosine}


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    loss: str = "mse",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-token loss between hidden states ``[batch, seq, width]`` (project the student first if widths differ)."""
    if loss not in HIDDEN_LOSSES:
        raise ValueError(f"Unknown hidden-state loss {loss!r}. Choose one of {sorted(HIDDEN_LOSSES)}.")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"Hidden states differ in shape: student {tuple(student_hidden.shape)}, teacher "
            f"{tuple(teacher_hidden.shape)}. Project the student's states to the teacher's width first."
        )
    per_token = HIDDEN_LOSSES[loss](student_hidden.float(), teacher_hidden.detach().float())
    return masked_mean(per_token, mask, reduction)


def attention_kl(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, *, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions ``[batch, heads, query, key]``, per query position.

    Returns ``[batch, query]`` averaged over heads (TinyBERT/MiniLM attention transfer). When the head counts differ
    the maps are first averaged over heads, the only comparison that needs no head alignment.
    """
    if student_probs.shape[1] != teacher_probs.shape[1]:
        student_probs, teacher_probs = student_probs.mean(1, keepdim=True), teacher_probs.mean(1, keepdim=True)
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"Attention maps differ in shape: student {tuple(student_probs.shape)}, teacher "
            f"{tuple(teacher_probs.shape)}."
        )
    eps = torch.finfo(torch.float32).tiny
    log_s = torch.log(student_probs.float().clamp_min(eps))
    t = teacher_probs.detach().float()
    per_key = torch.xlogy(t, t) - t * log_s
    if key_mask is not None:  # padded keys carry no probability in either map; drop their clamp residue
        per_key = per_key * key_mask[:, None, None, :].to(per_key.dtype)
    return per_key.sum(-1).mean(1)


def value_relation(values: torch.Tensor) -> torch.Tensor:
    """MiniLM's value relation: softmax(V·Vᵀ / √d) per head, from values ``[batch, heads, seq, head_dim]``."""
    return F.softmax(_relation_scores(values), dim=-1)


def value_relation_kl(
    student_values: torch.Tensor, teacher_values: torch.Tensor, *, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL between the value relations of teacher and student (MiniLM, Wang et al. 2020), ``[batch, query]``."""
    if key_mask is not None:
        bias = torch.zeros_like(key_mask, dtype=torch.float32).masked_fill(key_mask == 0, float("-inf"))
        s_scores = _relation_scores(student_values) + bias[:, None, None, :]
        t_scores = _relation_scores(teacher_values) + bias[:, None, None, :]
        return attention_kl(F.softmax(s_scores, -1), F.softmax(t_scores, -1), key_mask=key_mask)
    return attention_kl(value_relation(student_values), value_relation(teacher_values))


def _relation_scores(values: torch.Tensor) -> torch.Tensor:
    return values.float() @ values.float().transpose(-1, -2) / math.sqrt(values.shape[-1])
