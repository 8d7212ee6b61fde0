"""Distillation loss maths: pure torch, no Trainer, no transformers.

Every divergence in :data:`KD_LOSSES` takes the student's and the teacher's logits *already divided by the
temperature* and returns one value per position (shape ``logits.shape[:-1]``). :func:`distillation_loss` adds the
temperature, the T² scaling of Hinton et al. (2015) and masking around them. New losses are added with
:func:`register_kd_loss`.
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
    """KL(p || q) over the last dim from log-probabilities; 0·log 0 counts as 0."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 − weight_p)·q), computed stably in log space."""
    return torch.logsumexp(torch.stack([log_p + math.log(weight_p), log_q + math.log1p(-weight_p)]), dim=0)


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
    """Mean squared error between raw logits (Ba & Caruana 2014); temperature does not apply."""
    return (student_logits - teacher_logits).pow(2).mean(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-position ``values`` over positions where ``mask`` is true ("mean", "sum" or "none")."""
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the loss has shape {tuple(values.shape)}.")
        values = values * mask.to(values.dtype)
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
    **params: float,
) -> torch.Tensor:
    """Soft-target loss between student and teacher logits (``[..., num_classes]``).

    Returns the mean over positions where ``mask`` is true (all positions when ``mask`` is None), or the sum /
    per-position values with ``reduction="sum"|"none"``. Distribution losses are computed at ``temperature`` and
    multiplied by T² (``scale_by_t2``) so gradient magnitudes do not shrink as T grows (Hinton et al. 2015).
    ``params`` go to the loss, e.g. ``jsd_beta`` or ``skew_lambda``.
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
        per_position = KD_LOSSES[loss](student_logits / temperature, teacher_logits / temperature, **params)
        if scale_by_t2:
            per_position = per_position * temperature**2
    return masked_mean(per_position, mask, reduction)


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
