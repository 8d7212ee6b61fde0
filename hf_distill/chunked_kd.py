"""The KD divergence over chunks of positions, so that a large vocabulary does not multiply the step's memory.

A causal LM's logits are ``[batch, seq, vocab]``: at vocabulary 49,152 and batch 8 × 512 one fp32 copy is 805 MB,
and a divergence computed on the whole batch builds several more (the teacher in fp32, both log-softmaxes, their
exponentials, a mixture for JSD), most of which autograd keeps for the backward pass.
:func:`chunked_distillation_loss` computes :func:`~hf_distill.losses.distillation_loss` on ``chunk_size``
positions at a time, with each chunk's gradient taken right away (a custom autograd Function), so every
intermediate is bounded by one chunk and only the gradient ``[N, vocab]`` is kept for the backward pass; the
teacher's logits (:class:`~hf_distill.teacher_logits.TeacherLogits`) can go as soon as the loss is known. Only the
loss positions are computed (prompt and padding positions are skipped).

With ``alpha < 1`` the hard-label loss can be fused into the same pass (:class:`HardRows`): each chunk's gradient is
then that of ``kd_weight · KD + hard_weight · CE``, so one ``[N, vocab]`` gradient is kept instead of one for the KD
and a second (the log-softmax the cross-entropy saves) for the hard loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hf_distill.losses import KD_LOSSES, distillation_loss, masked_mean
from hf_distill.teacher_logits import TeacherLogits


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


@dataclass(frozen=True)
class HardRows:
    """The hard-label loss fused into the chunked pass: ``fn(logits [n, C], labels, labelled [n]) -> [n]`` per row,
    on the rows where ``labelled`` ([N] bool); ``kd_weight`` and ``hard_weight`` ([N]) are each row's weight of the
    KD and hard values in the loss the caller builds (a weighted sum over a common denominator, which backward
    checks)."""

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    labels: torch.Tensor
    labelled: torch.Tensor
    kd_weight: torch.Tensor
    hard_weight: torch.Tensor

    def values(self, part: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        labelled = self.labelled[index]
        hard = self.fn(part, self.labels[index], labelled)
        return torch.where(labelled, hard, torch.zeros_like(hard))  # a selection: -100 rows cannot leak a NaN


def _chunk_pass(
    student: torch.Tensor,
    rows: torch.Tensor,
    teacher: TeacherLogits,
    fn: _Divergence,
    chunk: int,
    hard: HardRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-row KD ``[N]`` (and hard loss ``[N]`` with ``hard``) and the gradient ``[N, C]`` of their weighted sum,
    ``chunk`` rows at a time (each chunk's gradient taken at once, so only the gradient outlives its chunk)."""
    kd = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
    ce = None if hard is None else torch.zeros_like(kd)
    grad = torch.zeros_like(student)
    for start in range(0, rows.numel(), chunk):
        index = rows[start : start + chunk]
        target = teacher.rows(index, fn.classes)
        with torch.enable_grad():
            part = student[index].detach().requires_grad_(True)
            kd_part = fn(part, target)
            total = kd_part
            if hard is not None:
                ce_part = hard.values(part, index)
                total = hard.kd_weight[index] * kd_part + hard.hard_weight[index] * ce_part
                ce[index] = ce_part.detach().float()
            (part_grad,) = torch.autograd.grad(total.sum(), part)
        kd[index] = kd_part.detach().float()
        grad.index_copy_(0, index, part_grad.to(grad.dtype))
    return kd, ce, grad


class _ChunkedWithHard(torch.autograd.Function):
    """Per-row KD ``[N]`` and hard loss ``[N]``; one stored gradient, of ``kd_weight · KD + hard_weight · hard``."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        rows: torch.Tensor,
        teacher: TeacherLogits,
        fn: _Divergence,
        chunk: int,
        hard: HardRows,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kd, ce, grad = _chunk_pass(student, rows, teacher, fn, chunk, hard)
        ctx.save_for_backward(grad, hard.kd_weight, hard.hard_weight)
        ctx.used = False
        return kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_kd: torch.Tensor, grad_ce: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("The fused chunked loss supports one backward pass per forward; set kd_chunk_size=0.")
        ctx.used = True
        grad, kd_weight, hard_weight = ctx.saved_tensors
        # The stored gradient is right only if the caller weighs each row's values as HardRows says (up to a common
        # factor per row, the normaliser): recover that factor and check it explains both incoming gradients.
        scale = torch.where(
            kd_weight > 0,
            grad_kd / kd_weight.clamp_min(1e-30),
            torch.where(hard_weight > 0, grad_ce / hard_weight.clamp_min(1e-30), torch.zeros_like(grad_kd)),
        )
        for weight, incoming in ((kd_weight, grad_kd), (hard_weight, grad_ce)):
            if not torch.allclose(scale * weight, incoming, rtol=1e-4, atol=1e-12):
                raise RuntimeError(
                    "The fused KD + hard loss was combined with other weights than HardRows.kd_weight / hard_weight; "
                    "compute the hard loss separately (hard=None)."
                )
        return grad.mul_(scale.to(grad.dtype)[:, None]), None, None, None, None, None


class _ChunkedDivergence(torch.autograd.Function):
    """Per-position divergence ``[N]`` of ``student [N, C]``, computed and differentiated ``chunk`` rows at a time.

    Each chunk's gradient is taken in the forward pass with autograd (the divergence of one position depends on
    that position's logits only, so the gradient of the chunk's sum is every row's own gradient); backward scales
    the stored ``[N, C]`` gradient by the incoming one in place. Compared with recomputing chunks in backward this
    runs each chunk once and keeps neither the student's nor the teacher's logits alive. ``rows`` are the positions
    computed (the loss positions); all others get value 0 and gradient 0.
    """

    @staticmethod
    def forward(
        ctx: Any, student: torch.Tensor, rows: torch.Tensor, teacher: TeacherLogits, fn: _Divergence, chunk: int
    ) -> torch.Tensor:
        out, _, grad = _chunk_pass(student, rows, teacher, fn, chunk)
        ctx.save_for_backward(grad)
        ctx.used = False
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:  # the stored gradient was scaled in place by the first backward pass
            raise RuntimeError(
                "The chunked KD loss supports one backward pass per forward (retain_graph=True is not supported); "
                "set kd_chunk_size=0 for the unchunked loss."
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out.to(grad.dtype)[:, None]), None, None, None, None


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
    hard: HardRows | None = None,
    **params: float,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-position KD loss ``[N]`` of ``student_logits [N, C_s]`` against ``teacher_logits [N, C_t]``, 0 off ``mask``.

    The values and gradients of ``distillation_loss(..., reduction="none")`` at the positions of ``mask`` (``[N]``
    bool), computed ``chunk_size`` positions at a time (0: all at once, the unchunked computation). Only the first
    ``num_classes`` classes of both sides are compared (default: all of the student's); they must exist on both.
    Without a gradient to compute (evaluation, a frozen student) the chunks are evaluated only. With ``hard``
    (training with ``chunk_size > 0`` only) it returns ``(kd [N], hard [N])``, the hard loss computed in the same
    chunks and one gradient kept for both.

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
    if hard is not None:
        if not (chunk_size and torch.is_grad_enabled() and student_logits.requires_grad):
            raise ValueError("hard= fuses the hard loss into a chunked training pass: chunk_size > 0 and a gradient.")
        if bool((hard.labelled & ~mask).any()):
            raise ValueError("hard.labelled must be a subset of mask (the loss positions the chunks visit).")
        return _ChunkedWithHard.apply(student_logits, rows, teacher, fn, int(chunk_size), hard)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _ChunkedDivergence.apply(student_logits, rows, teacher, fn, int(chunk_size))
    out = torch.zeros(mask.numel(), dtype=torch.float32, device=student_logits.device)
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            out[index] = fn(student_logits[index], teacher.rows(index, classes))
    return out


def fused_hard_rows(aligned: Any, kd_weights: torch.Tensor, args: Any, hard_fn: Callable) -> HardRows | None:
    """The :class:`HardRows` of a training batch (``aligned``: :class:`hf_distill.tasks.AlignedLogits`, rows
    example-major; ``kd_weights [batch]``), when the hard loss can share the chunked pass: ``args.alpha < 1``,
    ``args.kd_chunk_size > 0``, labels, a gradient, the labelled rows among the loss positions. None otherwise."""
    student = aligned.student
    if not (args.alpha < 1 and args.kd_chunk_size and aligned.labels is not None):
        return None
    if not (torch.is_grad_enabled() and student.requires_grad) or bool((aligned.labelled & ~aligned.mask).any()):
        return None
    per_row = student.shape[0] // kd_weights.shape[0]
    return HardRows(
        hard_fn,
        aligned.labels,
        aligned.labelled,
        kd_weights.to(torch.float32).repeat_interleave(per_row),
        (1.0 - args.alpha) * aligned.labelled.to(torch.float32),  # DistillationConfig.loss_weight("hard_loss")
    )


__all__ = ["HardRows", "chunked_distillation_loss", "fused_hard_rows"]
