"""How the loss terms are normalised: per-example sums and counts, accumulated-batch counts, logged means.

Every term (``kd_loss``, ``hard_loss``, ``hidden_loss``, ``attention_loss``) is a sum over the positions it covers
divided by how many such positions there are, counted over exactly the set the value stands for:

- the gradient of one optimizer step: all micro-batches of the accumulation step, on all ranks (so batch 8 ×
  accumulation 1, batch 4 × accumulation 2 and 2 ranks × batch 4 give the same update);
- a logged training value: the logging window, on all ranks;
- an evaluation value: the whole evaluation set, on all ranks, without the samples Accelerate repeats to even out
  the last batch.

Two kinds of position exist. Label-level terms (``kd_loss``, ``hard_loss``) count the *loss positions*
(:func:`~hf_distill.tasks.loss_positions`: one per example for sequence classification, the labelled tokens for
token classification, the shifted labelled tokens for causal LM). Layer terms (``hidden_loss``, ``attention_loss``)
count the *tokens* the attention mask keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hf_distill.tasks import Task, loss_positions

POSITIONS = "positions"
TOKENS = "tokens"
LAYER_TERMS = ("hidden_loss", "attention_loss")


@dataclass
class Term:
    """One loss component of a batch: ``sums[b]`` is the summed loss of example b over its ``counts[b]`` positions."""

    sums: torch.Tensor  # [batch] float, differentiable
    counts: torch.Tensor  # [batch] float
    unit: str  # POSITIONS or TOKENS
    # [batch] weight of each example's sum in the total, replacing the config's weight for the term: KD on
    # unlabelled examples weighs 1 where labelled ones weigh alpha. None: the config's weight for every example.
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchCounts:
    """Positions and tokens of one whole accumulation step, summed over ``ranks`` processes."""

    positions: torch.Tensor  # scalar
    tokens: torch.Tensor  # scalar
    ranks: int = 1

    def denominator(self, unit: str) -> torch.Tensor:
        """What a rank divides its summed loss by, so that DDP's gradient mean over ranks gives the global mean."""
        count = self.positions if unit == POSITIONS else self.tokens
        return count.float().clamp_min(1) / self.ranks


def token_mask(attention_mask: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: the tokens layer terms cover (all of ``reference``'s first two dims without a mask)."""
    if attention_mask is not None:
        return attention_mask.bool()
    return torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)


def example_counts(task: Task, batch: dict[str, Any]) -> torch.Tensor:
    """``[2]``: loss positions and tokens of a collated batch, by the same rules the loss uses.

    Raises:
        ValueError: the batch has neither ``input_ids`` nor ``inputs_embeds``.
    """
    reference = batch.get("input_ids", batch.get("inputs_embeds"))
    if reference is None:
        raise ValueError(f"A batch needs input_ids (or inputs_embeds) to count loss positions; got {sorted(batch)}.")
    labels, attention_mask = batch.get("labels"), batch.get("attention_mask")
    positions = loss_positions(task, labels, attention_mask, reference)
    num_positions = reference.shape[0] if positions is None else positions.sum()
    num_tokens = token_mask(attention_mask, reference).sum()
    device = reference.device
    return torch.stack([torch.as_tensor(n, device=device, dtype=torch.float32) for n in (num_positions, num_tokens)])


def per_example(values: torch.Tensor, mask: torch.Tensor, batch: int) -> Term:
    """Per-position ``values`` and ``mask`` (``[batch·k]`` or ``[batch, k]``) -> a :class:`Term` of loss positions.

    A selection (not a product) drops masked positions, so a NaN or inf there cannot reach the sum.
    """
    kept = torch.where(mask, values, torch.zeros_like(values)).reshape(batch, -1)
    return Term(kept.sum(1), mask.reshape(batch, -1).sum(1).float(), POSITIONS)


def per_example_tokens(values: torch.Tensor, mask: torch.Tensor) -> Term:
    """Per-token ``values`` ``[batch, seq]`` of a layer loss -> a :class:`Term` of tokens."""
    term = per_example(values, mask, values.shape[0])
    return Term(term.sums, term.counts, TOKENS)


class LossTally:
    """(sum, count) per loss component: over the logging window and the whole run (train), and one evaluation."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self._train: dict[str, torch.Tensor] = {}
        self._run: dict[str, torch.Tensor] = {}
        self._eval: dict[str, torch.Tensor] = {}

    def record(self, terms: dict[str, Term], training: bool) -> None:
        """Add a batch. Eval batches are gathered per example so that repeated padding samples are dropped."""
        if not terms:
            return
        names = sorted(terms)
        # [batch, components, 2]: one row per example, so gather_for_metrics can drop Accelerate's repeats.
        rows = torch.stack([torch.stack([terms[n].sums, terms[n].counts], -1) for n in names], 1).detach().float()
        store = self._train
        if not training:
            store = self._eval
            if self.accelerator.num_processes > 1:
                # Ranks may hold batches of different sizes; zero rows add nothing to sums or counts.
                rows = self.accelerator.gather_for_metrics(self.accelerator.pad_across_processes(rows, dim=0))
        totals = rows.sum(0)
        for target in (store, self._run) if training else (store,):
            for i, name in enumerate(names):
                target[name] = target[name] + totals[i] if name in target else totals[i]

    def reset_eval(self) -> None:
        self._eval.clear()

    def train_means(self) -> dict[str, float]:
        """Means over the logging window on all ranks (a collective: every rank must call it); resets the window."""
        means = self._means(self._train, reduce=self.accelerator.num_processes > 1)
        self._train.clear()
        return means

    def run_means(self) -> dict[str, float]:
        """Means over the whole training run on all ranks (a collective), like Trainer's train_loss; resets it."""
        means = self._means(self._run, reduce=self.accelerator.num_processes > 1)
        self._run.clear()
        self._train.clear()
        return means

    def eval_means(self) -> dict[str, float]:
        """Means over the evaluation run (already gathered); resets it."""
        means = self._means(self._eval, reduce=False)
        self._eval.clear()
        return means

    def _means(self, store: dict[str, torch.Tensor], reduce: bool) -> dict[str, float]:
        if not store:
            return {}
        names = sorted(store)
        stacked = torch.stack([store[n] for n in names])
        if reduce:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        return {n: float(s / c) if c > 0 else 0.0 for n, (s, c) in zip(names, stacked.tolist(), strict=True)}
