"""The teacher's logits as the KD loss reads them: a chunk of positions at a time, never all in fp32 at once.

A causal LM's logits are ``[batch, seq, vocab]``; at vocabulary 49,152 and batch 8 × 512 one fp32 copy is 805 MB.
:class:`TeacherLogits` holds the teacher's side of a batch in one of three forms and turns any chunk of positions
into fp32 logits on demand:

- ``head``: the teacher's last hidden state ``[P, hidden]`` and its LM head, applied per chunk. The teacher's full
  logits are never computed (:func:`streamed_head` skips them in its forward pass); used whenever the teacher's
  logits are exactly its head applied to that state (:func:`head_is_last_step` checks it once).
- ``dense``: the logits in the teacher's own dtype (a bf16 teacher's stay bf16), cast to fp32 per chunk.
- ``top-k``: the top-k logits, their indices and the probability mass of all other classes: the representation of
  the offline cache (:mod:`hf_distill.cache`) and of the online ``teacher_top_k``.

Indexing and reshaping a :class:`TeacherLogits`, as :func:`~hf_distill.tasks.align_logits` does for each task's
position rule, move only an index of positions, never the logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hf_distill.tasks import unwrap_model

logger = logging.getLogger(__name__)
# Positions per chunk when a whole view is summarised or densified (the loss has its own kd_chunk_size).
_CHUNK = 256


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


def topk_summary(
    logits: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest logits ``[..., k]`` (fp32), their indices, and the rest mass ``[...]`` at ``temperature``.

    The rest mass is the probability of every class outside the top k: what :func:`dense_teacher_logits` spreads
    over them again. Computed a chunk of positions at a time (no fp32 copy of all logits). The offline cache and
    the online ``teacher_top_k`` both use it.

    Raises:
        ValueError: ``top_k`` outside ``[1, classes]``.
    """
    view = TeacherLogits.dense(logits).summarised(top_k, temperature)
    lead = logits.shape[:-1]
    return view.values.reshape(*lead, top_k), view.indices.reshape(*lead, top_k), view.rest.reshape(lead)


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's logits at some positions, ``shape = (*positions.shape, num_classes)``, read by rows.

    ``positions`` holds, for every position of this view, its row in the stored tensors: ``hidden`` ``[P, H]`` with
    ``head``; ``logits`` ``[P, C]``; or ``values``/``indices`` ``[P, k]`` and ``rest`` ``[P]`` of a top-k summary at
    ``temperature``. Indexing and ``reshape`` act on the position dimensions only: the class dimension is never
    reshaped, whatever size a caller names for it (``align_logits`` names the student's, which may be a padded
    vocabulary of another size).
    """

    positions: torch.Tensor
    num_classes: int
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: nn.Module | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    temperature: float = 1.0

    @classmethod
    def dense(cls, logits: torch.Tensor) -> TeacherLogits:
        """A view of dense logits ``[..., C]``, kept in their own dtype."""
        logits = logits.detach()
        flat = logits.reshape(-1, logits.shape[-1])
        return cls(_positions(logits.shape[:-1], logits.device), int(logits.shape[-1]), logits=flat)

    @classmethod
    def from_head(cls, hidden: torch.Tensor, head: nn.Module, num_classes: int) -> TeacherLogits:
        """A view of ``head(hidden)`` for the last hidden state ``[..., H]``, computed per chunk of positions."""
        hidden = hidden.detach()
        flat = hidden.reshape(-1, hidden.shape[-1])
        return cls(_positions(hidden.shape[:-1], hidden.device), int(num_classes), hidden=flat, head=head)

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

    def summarised(self, top_k: int, temperature: float, classes: int | None = None) -> TeacherLogits:
        """This view as a top-k summary over its first ``classes`` classes, built a chunk of positions at a time.

        Raises:
            ValueError: ``top_k`` outside ``[1, classes]``.
        """
        classes = classes or self.num_classes
        if not 1 <= top_k <= classes:
            raise ValueError(f"top_k must be in [1, {classes}] (the teacher's classes), got {top_k}.")
        count = self.positions.numel()
        values = torch.empty(count, top_k, dtype=torch.float32, device=self.device)
        indices = torch.empty(count, top_k, dtype=torch.long, device=self.device)
        rest = torch.empty(count, dtype=torch.float32, device=self.device)
        for index in _chunks(count, self.device):
            part = self.rows(index, classes)
            top = part.topk(top_k, dim=-1)
            probs = torch.softmax(part / temperature, dim=-1)
            values[index], indices[index] = top.values, top.indices
            rest[index] = (1.0 - probs.gather(-1, top.indices).sum(-1)).clamp_min(0.0)
        shape = self.positions.shape
        return TeacherLogits.top_k(
            values.reshape(*shape, top_k), indices.reshape(*shape, top_k), rest.reshape(shape), classes, temperature
        )

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

    def reshape(self, *shape: Any) -> TeacherLogits:
        """Reshape the position dimensions: ``shape[:-1]``; the last entry stands for the (unchanged) classes."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return replace(self, positions=self.positions.reshape(shape[:-1]))

    @torch.no_grad()
    def rows(self, index: torch.Tensor, classes: int | None = None) -> torch.Tensor:
        """fp32 logits ``[len(index), classes]`` of the positions ``index`` (into the flattened positions)."""
        classes = classes or self.num_classes
        source = self.positions.reshape(-1)[index]
        if self.hidden is not None:
            return self.head(self.hidden[source])[:, :classes].float()
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


def _chunks(count: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, count, _CHUNK):
        yield torch.arange(start, min(start + _CHUNK, count), device=device)


@contextlib.contextmanager
def streamed_head(head: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ``head`` records its input (the last hidden state) and computes its output on no positions.

    The model's forward then returns logits with a sequence length of 0 and never allocates ``[batch, seq, vocab]``;
    the recorded state (``captured["hidden"]``, ``[batch, seq, hidden]``) goes to :meth:`TeacherLogits.from_head`.
    A forward pre-hook, so any architecture whose head is its output embedding module works unchanged.
    """
    captured: dict[str, torch.Tensor] = {}

    def before_head(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        captured["hidden"] = hidden
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(before_head)
    try:
        yield captured
    finally:
        handle.remove()


def streamable_head(model: nn.Module, run: Callable[[dict], Any]) -> nn.Module | None:
    """A causal LM's LM head when its logits are exactly that head applied to its last hidden state, else None.

    ``run`` calls ``model`` on a batch dict the way training does. A model whose logits are transformed after the
    head (soft-capping, scaling) gets a warning and None: its full logits are then kept.
    """
    base = unwrap_model(model)
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    vocab = int(getattr(embeddings, "num_embeddings", 0) or 0)
    if head is None or vocab < 1:
        return None
    if head_is_last_step(head, run, vocab):
        return head
    logger.warning(
        "The teacher's logits are not its LM head applied to its last hidden state (e.g. soft-capped logits): its "
        "full [batch, seq, vocab] logits are kept for the KD loss."
    )
    return None


@torch.no_grad()
def head_is_last_step(head: nn.Module | None, run: Callable[[dict], Any], vocab: int) -> bool:
    """True when a model's logits are exactly ``head`` applied to the state it receives (checked on 8 tokens).

    Some architectures transform the head's output (Gemma 2's soft-capping, Cohere's logit scale): for those the
    full logits are kept. ``run`` calls the model on a batch dict the way training does; ``vocab`` bounds the ids.
    """
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return False
    device = head.weight.device
    ids = (torch.arange(8, device=device)[None] * 7919) % vocab
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full = run(batch).logits
    with streamed_head(head) as captured:
        run(batch)
    if "hidden" not in captured:
        return False
    streamed = head(captured["hidden"])
    return streamed.shape == full.shape and torch.allclose(streamed.float(), full.float(), rtol=1e-4, atol=1e-4)


__all__ = [
    "TeacherLogits",
    "dense_teacher_logits",
    "head_is_last_step",
    "streamable_head",
    "streamed_head",
    "topk_summary",
]
