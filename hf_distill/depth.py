"""Depth pruning: which of the teacher's blocks a shallower student keeps, measured on calibration data.

For LLMs the choice decides almost everything: cutting SmolLM2-135M (30 blocks, perplexity 15.3 on Self-Instruct
references) to 20 evenly spaced ones gives 17,245, dropping the contiguous run 12–21 instead gives 270.
Methods (``create_student(layer_selection=...)``):

- ``"uniform"``: evenly spaced blocks, first and last included (DistilBERT, Sanh et al. 2019); no data.
- ``"block_influence"``: ShortGPT (Men et al. 2024): ``BI_i = 1 − cos(x_i, y_i)`` of block i's input and output
  hidden states, averaged over the real calibration tokens; the ``num_layers`` most influential blocks stay. One
  forward pass; any architecture.
- ``"contiguous"``: drop the one contiguous run of ``L − num_layers`` blocks whose removal gives the lowest
  calibration perplexity (Gromov et al. 2024 drop one contiguous run, chosen by angular distance; we measure the
  perplexity itself). ``L − num_layers + 1`` forward passes; causal LMs.
- ``"greedy"``: iterative removal (Kim et al. 2024, "Shortened LLaMA", PPL criterion): remove one block at a time,
  each time the one whose removal raises calibration perplexity least. About ``(L + n) (L − n) / 2`` forward
  passes for ``n`` kept blocks; causal LMs.
- ``"importance"``: the default for causal LMs given calibration data, currently ``"greedy"``: it measures the
  quantity that matters (perplexity) and, unlike ``"contiguous"``, may keep non-adjacent blocks, which deep cuts
  need (the issue's 15- and 10-block contiguous drops stay above 10⁵). The comparison of all methods on
  SmolLM2-135M is in BENCHMARKS.md, "Which layers to keep"; revisit this choice with it.

Calibration perplexity is over the tokens that have labels (a ``labels`` column, e.g. the response tokens of
:func:`hf_distill.chat.tokenize_chat`), else over every real next token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_distill.depth_passes import block_influence, calibration_nll, only_blocks, recorded_pass, replay_bytes
from hf_distill.tasks import Task, infer_task

__all__ = ["LAYER_SELECTIONS", "LayerChoice", "block_influence", "calibration_nll", "only_blocks", "select_layers"]

logger = logging.getLogger(__name__)

LAYER_SELECTIONS = ("importance", "uniform", "block_influence", "contiguous", "greedy")
IMPORTANCE_METHOD = "greedy"  # what "importance" means (see the module docstring)
GREEDY_CANDIDATES = 4  # blocks measured per greedy step (the lowest block influence first)
# Greedy removal replays cached block inputs while they fit in this many bytes (SmolLM2-135M, 8 rows of 256 tokens:
# ~0.7 GB); larger calibration sets fall back to full passes, which hold no activations.
REPLAY_BUDGET_BYTES = 2 * 1024**3
NEEDS_LM_HEAD = ("importance", "contiguous", "greedy")  # they measure perplexity


@dataclass
class LayerChoice:
    """The kept teacher blocks (0-based, increasing), how they were chosen and what was measured (JSON-ready)."""

    layers: list[int]
    method: str
    scores: dict[str, Any] = field(default_factory=dict)


def check_selection(value: Any) -> str:
    """``value`` if it names a layer-selection method, else ValueError naming what was received and the options."""
    if not isinstance(value, str) or value not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection must be one of {', '.join(map(repr, LAYER_SELECTIONS))}; got {value!r}.")
    return value


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        return infer_task(model) is Task.CAUSAL_LM
    except ValueError:  # a head hf_distill does not train: not a causal LM for layer selection
        return False


def resolve_method(
    teacher: nn.Module, num_layers: int | None, layers: list[int] | None, requested: str | None, data: Any
) -> str:
    """The layer-selection method to use: the request, checked, or the default ("importance" for a causal LM with
    calibration data and ``num_layers``, "uniform" otherwise). Raises ValueError before any work."""
    if requested is None:
        causal = _is_causal_lm(teacher)
        return "importance" if causal and data is not None and num_layers is not None else "uniform"
    method = check_selection(requested)
    if method == "uniform":
        return method
    if layers is not None or num_layers is None:
        raise ValueError(
            f"layer_selection={method!r} chooses which num_layers blocks stay; pass num_layers (not explicit layers)."
        )
    if data is None:
        raise ValueError(
            f"layer_selection={method!r} measures the blocks on calibration_data; pass a few dozen tokenized "
            "training examples (e.g. hf_distill.chat.tokenize_chat(...).dataset), or use layer_selection='uniform'."
        )
    if method in NEEDS_LM_HEAD and not _is_causal_lm(teacher):
        raise ValueError(
            f"layer_selection={method!r} measures perplexity and needs a causal LM; {type(teacher).__name__} is not "
            "one. Use 'block_influence' (any architecture) or 'uniform'."
        )
    return method


def _nll_without(model: nn.Module, stack: str, layers: list[int], batches: list[dict[str, torch.Tensor]]) -> float:
    with only_blocks(model, stack, layers):
        return calibration_nll(model, batches)


def contiguous(model: nn.Module, stack: str, num_layers: int, batches: list[dict[str, torch.Tensor]]) -> LayerChoice:
    """Drop the contiguous run of blocks whose removal gives the lowest calibration perplexity."""
    total = len(model.get_submodule(stack))
    drop = total - num_layers
    perplexity: dict[str, float] = {}
    for start in tqdm(range(total - drop + 1), desc="Layer selection (contiguous)", unit="candidate"):
        kept = [i for i in range(total) if not start <= i < start + drop]
        perplexity[f"{start}-{start + drop - 1}"] = math.exp(_nll_without(model, stack, kept, batches))
    best = min(perplexity, key=perplexity.__getitem__)
    start = int(best.split("-")[0])
    kept = [i for i in range(total) if not start <= i < start + drop]
    return LayerChoice(kept, "contiguous", {"dropped": best, "calibration_perplexity": perplexity[best]})


def greedy(
    model: nn.Module,
    stack: str,
    num_layers: int,
    batches: list[dict[str, torch.Tensor]],
    candidates: int | None = GREEDY_CANDIDATES,
) -> LayerChoice:
    """Remove one block at a time, each time the one whose removal raises calibration perplexity least.

    Each step measures the ``candidates`` blocks of lowest block influence in the current (already shortened)
    model, or every block with ``None``: measuring all is ``(L + n)(L − n) / 2`` passes, screening cuts it to about
    ``(candidates + 1)(L − n)`` (why: on 2 CPU cores one pass of SmolLM2-135M over 800 tokens takes ~10-20 s). With
    screening, each candidate's pass replays the cached inputs of the blocks before it and also yields the block
    influence of the shortened model (``hf_distill.depth_passes``): about ``candidates / 2`` full passes per step,
    with the same choices, while the cache fits ``REPLAY_BUDGET_BYTES``.
    """
    total = len(model.get_submodule(stack))
    if candidates is not None and replay_bytes(model, batches, total, candidates) <= REPLAY_BUDGET_BYTES:
        removed, after = _greedy_replayed(model, stack, num_layers, batches, candidates)
    else:
        logger.info("Greedy layer selection: full passes (cached block inputs would exceed REPLAY_BUDGET_BYTES).")
        removed, after = _greedy_full(model, stack, num_layers, batches, candidates)
    kept = [i for i in range(total) if i not in removed]
    scores = {"removed_in_order": removed, "perplexity_after_each_removal": after, "candidates": candidates}
    return LayerChoice(kept, "greedy", {**scores, "calibration_perplexity": after[-1] if after else None})


def _greedy_full(
    model: nn.Module, stack: str, num_layers: int, batches: list[dict[str, torch.Tensor]], candidates: int | None
) -> tuple[list[int], list[float]]:
    """Greedy removal with full passes: the removed blocks in order and the perplexity after each removal."""
    kept = list(range(len(model.get_submodule(stack))))
    removed: list[int] = []
    after: list[float] = []
    with tqdm(total=len(kept) - num_layers, desc="Layer selection (greedy)", unit="block removed") as bar:
        while len(kept) > num_layers:
            pool = list(kept)
            if candidates is not None and candidates < len(kept):
                with only_blocks(model, stack, kept):
                    influence = block_influence(model, stack, batches)
                pool = [kept[i] for i in sorted(range(len(kept)), key=influence.__getitem__)[:candidates]]
            losses = {block: _nll_without(model, stack, [i for i in kept if i != block], batches) for block in pool}
            block = min(losses, key=losses.__getitem__)
            kept.remove(block)
            removed.append(block)
            after.append(math.exp(losses[block]))
            bar.update(1)
    return removed, after


def _greedy_replayed(
    model: nn.Module, stack: str, num_layers: int, batches: list[dict[str, torch.Tensor]], candidates: int
) -> tuple[list[int], list[float]]:
    """:func:`_greedy_full`'s choices, each candidate run from its cached input (one full pass at the start)."""
    kept = list(range(len(model.get_submodule(stack))))
    current = recorded_pass(model, stack, kept, batches)  # inputs and influence of the current stack, by position
    inputs, influence = current.inputs, current.influence
    removed: list[int] = []
    after: list[float] = []
    with tqdm(total=len(kept) - num_layers, desc="Layer selection (greedy)", unit="block removed") as bar:
        while len(kept) > num_layers:
            positions = range(len(kept))  # every block, in order, as _greedy_full measures them without screening
            if candidates < len(kept):
                positions = sorted(positions, key=influence.__getitem__)[:candidates]
            passes = {p: recorded_pass(model, stack, kept[p:], batches, replay=inputs[p]) for p in positions}
            p = min(passes, key=lambda q: passes[q].nll)
            # The shortened stack: blocks before p unchanged; from p on, what the chosen pass recorded.
            inputs, influence = inputs[:p] + passes[p].inputs, influence[:p] + passes[p].influence
            removed.append(kept.pop(p))
            after.append(math.exp(passes[p].nll))
            bar.update(1)
    return removed, after


def select_layers(
    model: nn.Module, stack: str, num_layers: int, method: str, batches: list[dict[str, torch.Tensor]]
) -> LayerChoice:
    """The ``num_layers`` blocks ``method`` (not "uniform") keeps, measured on ``batches``; the model is left as it
    was (eval mode during the measurement, its train/eval mode restored)."""
    method = IMPORTANCE_METHOD if method == "importance" else method
    total = len(model.get_submodule(stack))
    was_training = model.training
    model.eval()
    try:
        if num_layers == total:
            return LayerChoice(list(range(total)), method)
        if method == "block_influence":
            influence = block_influence(model, stack, batches)
            kept = sorted(torch.topk(torch.tensor(influence), num_layers).indices.tolist())
            return LayerChoice(kept, method, {"block_influence": [round(v, 6) for v in influence]})
        return (contiguous if method == "contiguous" else greedy)(model, stack, num_layers, batches)
    finally:
        model.train(was_training)
