"""The KD divergence over chunks of positions, so that a large vocabulary does not multiply the step's memory.

A causal LM's logits are ``[batch, seq, vocab]``: at vocabulary 49,152 and batch 8 × 512 one fp32 copy is 805 MB,
and a divergence computed on the whole batch builds several more (the teacher in fp32, both log-softmaxes, their
exponentials, a mixture for JSD), most of which autograd keeps for the backward pass.
:func:`chunked_distillation_loss` computes :func:`~hf_distill.losses.distillation_loss` on ``chunk_size``
positions at a time and recomputes each chunk in the backward pass (a custom autograd Function: the same idea as
activation checkpointing, with only the student's logits saved), so every intermediate is bounded by one chunk.
Only the loss positions are computed (prompt and padding positions are skipped).

:class:`TeacherLogits` is the teacher's side: its logits at the batch's positions, read a chunk of rows at a time
(in the teacher's own dtype, cast to fp32 per chunk), either dense or as top-k logits plus the probability mass of
the other classes (the representation of the offline cache, :mod:`hf_distill.cache`), from a cache or online
(``teacher_top_k``). Indexing and reshaping it, as :func:`~hf_distill.tasks.align_logits` does for every position
rule, move only an index, never the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from hf_distill.losses import KD_LOSSES, distillation_loss, masked_mean

# Positions per chunk of the top-k summary's softmax: bounded like the loss, and a single chunk for classifiers.
_SUMMARY_CHUNK = 256


def topk_summary(
    logits: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's ``top_k`` largest logits ``[..., k]`` (fp32), their indices, and the rest mass ``[...]``.

    The rest mass is the probability, at ``temperature``, of every class outside the top k: what
    :func:`dense_teacher_logits` spreads over them again. Computed over chunks of positions, so that no fp32 copy
    of all the logits is made. The offline cache and the online ``teacher_top_k`` both use it.

    Raises:
        ValueError: ``top_k`` outside ``[1, classes]``.
    """
    classes = int(logits.shape[-1])
    if not 1 <= top_k <= classes:
        raise ValueError(f"top_k must be in [1, {classes}] (the teacher's classes), got {top_k}.")
    flat = logits.reshape(-1, classes)
    values = torch.empty(flat.shape[0], top_k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(flat.shape[0], top_k, dtype=torch.long, device=logits.device)
    rest = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], _SUMMARY_CHUNK):
        part = flat[start : start + _SUMMARY_CHUNK].float()
        top = part.topk(top_k, dim=-1)
        probs = torch.softmax(part / temperature, dim=-1)
        values[start : start + _SUMMARY_CHUNK] = top.values
        indices[start : start + _SUMMARY_CHUNK] = top.indices
        rest[start : start + _SUMMARY_CHUNK] = (1.0 - probs.gather(-1, top.indices).sum(-1)).clamp_min(0.0)
    lead = logits.shape[:-1]
    return values.reshape(*lead, top_k), indices.reshape(*lead, top_k), rest.reshape(lead)


def dense_teacher_logits(
    topk_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    rest_mass: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """Rebuild full teacher logits ``[..., num_classes]`` from a top-k summary (the cache's, or ``teacher_top_k``'s).

    Full cache (k = num_classes): the raw logits, exactly (``-inf`` included: the losses read it as probability 0).
    Partial cache: logits ``T·log p`` whose softmax at temperature T gives the top-k probabilities scaled to
    ``1 − rest_mass`` and the rest mass spread evenly. Built in log space, so a ``-inf`` top-k logit stays an exact
    0 probability (never a NaN); the spread rest keeps a floor of float32's smallest normal number, because a cache
    cannot tell a leftover of exactly 0 from one that underflowed.
    """
    k = topk_logits.shape[-1]
    if k == num_classes:
        return torch.zeros(*topk_logits.shape[:-1], num_classes, device=topk_logits.device).scatter(
            -1, topk_indices, topk_logits.float()
        )
    log_tiny = math.log(torch.finfo(torch.float32).tiny)
    rest_mass = rest_mass.float()
    log_top = torch.log_softmax(topk_logits.float() / temperature, -1) + torch.log1p(-rest_mass).unsqueeze(-1)
    log_other = (torch.log(rest_mass / (num_classes - k)).clamp_min(log_tiny)).unsqueeze(-1)
    log_probs = log_other.expand(*topk_logits.shape[:-1], num_classes).clone().scatter(-1, topk_indices, log_top)
    return temperature * log_probs


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's logits at some positions, ``shape = (*positions.shape, num_classes)``, read by rows.

    ``positions`` holds, for every position of this view, its row in the stored tensors (``logits`` ``[P, C]``, or
    ``values``/``indices`` ``[P, k]`` and ``rest`` ``[P]`` of a top-k summary at ``temperature``). Indexing and
    ``reshape`` act on the position dimensions only: the class dimension is never reshaped, whatever size a caller
    names for it (``align_logits`` names the student's, which may be a padded vocabulary of another size).
    """

    positions: torch.Tensor
    num_classes: int
    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    temperature: float = 1.0

    @classmethod
    def dense(cls, logits: torch.Tensor) -> TeacherLogits:
        """A view of dense logits ``[..., C]`` (any dtype: a bf16 teacher's logits stay bf16 until a chunk is read)."""
        logits = logits.detach()
        flat = logits.reshape(-1, logits.shape[-1])
        return cls(_positions(logits.shape[:-1], logits.device), int(logits.shape[-1]), logits=flat)

    @classmethod
    def top_k(
        cls, values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int, temperature: float
    ) -> TeacherLogits:
        """A view of a top-k summary: ``values``/``indices`` ``[..., k]``, ``rest`` ``[...]`` (see the cache)."""
        k = values.shape[-1]
        return cls(
            _positions(rest.shape, rest.device),
            int(num_classes),
            values=values.detach().reshape(-1, k),
            indices=indices.reshape(-1, k),
            rest=rest.detach().reshape(-1),
            temperature=float(temperature),
        )

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, top_k: int | None, temperature: float, classes: int | None = None
    ) -> TeacherLogits:
        """Online teacher logits ``[..., C]`` as a view: dense, or summarised to their top ``top_k`` at once.

        ``classes`` keeps only the first ``classes`` columns (a padded vocabulary); the top-k summary is then taken
        over those, so it is exact for the compared columns.
        """
        if not top_k:
            return cls.dense(logits)
        classes = classes or int(logits.shape[-1])
        values, indices, rest = topk_summary(logits.detach()[..., :classes], top_k, temperature)
        return cls.top_k(values, indices, rest, classes, temperature)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.positions.shape, self.num_classes))

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def dim(self) -> int:
        return self.positions.dim() + 1

    def detach(self) -> TeacherLogits:
        return self

    def __getitem__(self, key: Any) -> TeacherLogits:
        return replace(self, positions=self.positions[key])

    def reshape(self, *shape: int) -> TeacherLogits:
        """Reshape the position dimensions: ``shape[:-1]``; the last entry stands for the (unchanged) classes."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return replace(self, positions=self.positions.reshape(shape[:-1]))

    def rows(self, index: torch.Tensor, classes: int | None = None) -> torch.Tensor:
        """fp32 logits ``[len(index), classes]`` of the positions ``index`` (into the flattened positions)."""
        classes = classes or self.num_classes
        source = self.positions.reshape(-1)[index]
        if self.logits is not None:
            return self.logits[source, :classes].float()
        dense = dense_teacher_logits(
            self.values[source], self.indices[source], self.rest[source], self.num_classes, self.temperature
        )
        return dense[:, :classes]

    def to_dense(self, classes: int | None = None) -> torch.Tensor:
        """All positions at once, ``[*positions.shape, classes]`` fp32 (the unchunked path)."""
        flat = torch.arange(self.positions.numel(), device=self.device)
        return self.rows(flat, classes).reshape(*self.positions.shape, -1)


def _positions(shape: torch.Size, device: torch.device) -> torch.Tensor:
    return torch.arange(shape.numel(), device=device).reshape(shape)


@dataclass(frozen=True)
class _Divergence:
    """One registered KD loss with its options, applied to a chunk of rows."""

    loss: str
    temperature: float
    scale_by_t2: bool
    multi_label: bool
    classes: int
    params: dict[str, float]

    def __call__(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        return distillation_loss(
            student_rows[:, : self.classes],
            teacher_rows,
            loss=self.loss,
            temperature=self.temperature,
            scale_by_t2=self.scale_by_t2,
            reduction="none",
            multi_label=self.multi_label,
            **self.params,
        )


class _ChunkedDivergence(torch.autograd.Function):
    """Per-position divergence ``[N]`` of ``student [N, C]`` computed and differentiated ``chunk`` rows at a time.

    Only the student's logits are saved; backward recomputes each chunk's divergence with autograd and writes its
    gradient rows, so at most one chunk's intermediates exist at any time. ``rows`` are the positions computed
    (the loss positions); all others get value 0 and gradient 0.
    """

    @staticmethod
    def forward(
        ctx: Any, student: torch.Tensor, rows: torch.Tensor, teacher: TeacherLogits, fn: _Divergence, chunk: int
    ) -> torch.Tensor:
        out = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
        for start in range(0, rows.numel(), chunk):
            index = rows[start : start + chunk]
            out[index] = fn(student[index], teacher.rows(index, fn.classes))
        ctx.save_for_backward(student, rows)
        ctx.teacher, ctx.fn, ctx.chunk = teacher, fn, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, rows = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for start in range(0, rows.numel(), ctx.chunk):
            index = rows[start : start + ctx.chunk]
            with torch.enable_grad():
                part = student[index].detach().requires_grad_(True)
                values = ctx.fn(part, ctx.teacher.rows(index, ctx.fn.classes))
                (part_grad,) = torch.autograd.grad(values, part, grad_out[index].to(values.dtype))
            grad.index_copy_(0, index, part_grad.to(grad.dtype))
        return grad, None, None, None, None


def chunked_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TeacherLogits,
    mask: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    multi_label: bool = False,
    chunk_size: int = 0,
    num_classes: int | None = None,
    **params: float,
) -> torch.Tensor:
    """Per-position KD loss ``[N]`` of ``student_logits [N, C_s]`` against ``teacher_logits [N, C_t]``, 0 off ``mask``.

    The values and gradients of ``distillation_loss(..., reduction="none")`` at the positions of ``mask`` (``[N]``
    bool), computed ``chunk_size`` positions at a time (0: all at once, the unchunked computation). Only the first
    ``num_classes`` classes of both sides are compared (default: all of the student's); they must exist on both.

    Raises:
        ValueError: unknown loss, a negative chunk size, or shapes that do not line up.
    """
    if loss not in KD_LOSSES:
        raise ValueError(f"Unknown KD loss {loss!r}. Choose one of {sorted(KD_LOSSES)} or register your own.")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: no chunking), got {chunk_size}.")
    teacher = teacher_logits if isinstance(teacher_logits, TeacherLogits) else TeacherLogits.dense(teacher_logits)
    classes = num_classes or int(student_logits.shape[-1])
    if student_logits.dim() != 2 or teacher.shape[:-1] != student_logits.shape[:-1] or mask.shape != teacher.shape[:-1]:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher.shape)} and mask "
            f"{tuple(mask.shape)} must be [N, classes], [N, classes] and [N] over the same N positions."
        )
    if not classes <= min(int(student_logits.shape[-1]), teacher.num_classes):
        raise ValueError(
            f"num_classes={classes} compared classes, but the student has {student_logits.shape[-1]} and the teacher "
            f"{teacher.num_classes}."
        )
    fn = _Divergence(loss, float(temperature), scale_by_t2, multi_label, classes, dict(params))
    mask = mask.bool()
    if chunk_size == 0:
        every = torch.arange(mask.numel(), device=mask.device)
        return masked_mean(fn(student_logits, teacher.rows(every, classes)), mask, "none")
    rows = mask.nonzero().squeeze(-1)
    return _ChunkedDivergence.apply(student_logits, rows, teacher, fn, int(chunk_size))


__all__ = ["TeacherLogits", "chunked_distillation_loss", "dense_teacher_logits", "topk_summary"]
