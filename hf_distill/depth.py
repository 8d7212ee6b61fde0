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

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hf_distill.tasks import IGNORE_INDEX, Task, infer_task

logger = logging.getLogger(__name__)

LAYER_SELECTIONS = ("importance", "uniform", "block_influence", "contiguous", "greedy")
IMPORTANCE_METHOD = "greedy"  # what "importance" means (see the module docstring)
GREEDY_CANDIDATES = 4  # blocks measured per greedy step (the lowest block influence first)
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


def _stack_parent(model: nn.Module, stack: str) -> tuple[nn.Module, str]:
    parent, _, attr = stack.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextlib.contextmanager
def only_blocks(model: nn.Module, stack: str, layers: list[int]) -> Iterator[None]:
    """Run ``model`` with only ``layers`` of its block stack (no weights copied); everything is restored after.

    The config's ``num_hidden_layers`` and per-layer lists (e.g. Qwen2's ``layer_types``, read by position) follow
    the kept blocks while inside, as in the cut student.
    """
    parent, attr = _stack_parent(model, stack)
    full = getattr(parent, attr)
    config = model.config
    total = config.num_hidden_layers
    saved = {k: v for k, v in vars(config).items() if isinstance(v, list) and len(v) == total and k != "architectures"}
    setattr(parent, attr, nn.ModuleList([full[i] for i in layers]))
    config.num_hidden_layers = len(layers)
    for key, value in saved.items():
        setattr(config, key, [value[i] for i in layers])
    try:
        yield
    finally:
        setattr(parent, attr, full)
        config.num_hidden_layers = total
        for key, value in saved.items():
            setattr(config, key, value)


def _inputs(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The batch's model inputs; no KV cache (a shortened stack keeps its blocks' original cache indices)."""
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def block_influence(model: nn.Module, stack: str, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """ShortGPT block influence ``1 − cos(input, output)`` of every block, mean over real tokens; [num_blocks]."""
    blocks = model.get_submodule(stack)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    mask = torch.ones(1, 1)

    def hook(index: int) -> Any:
        def record(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # [batch, seq]
            sums[index] += float(((1 - cos) * mask).sum())

        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # the logits are not needed: the LM head sees one position (a 49k vocabulary costs ~20 %)
        handles.append(head.register_forward_pre_hook(lambda _m, args: (args[0][:, :1],)))
    device, tokens = next(model.parameters()).device, 0.0
    try:
        for batch in batches:
            inputs = _inputs(model, batch, device)
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).float()
            tokens += float(mask.sum())
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / tokens).tolist()


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets ``[batch, seq − 1]``: the labels, else the real input tokens; -100 where not scored."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    elif labels.shape != batch["input_ids"].shape:
        raise ValueError(
            f"Calibration labels must be per-token like input_ids ({tuple(batch['input_ids'].shape)}), got shape "
            f"{tuple(labels.shape)}; pass causal-LM data (e.g. hf_distill.chat.tokenize_chat) or drop the labels."
        )
    return labels[:, 1:]


@torch.no_grad()
def calibration_nll(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token negative log-likelihood (nats per scored token) of a causal LM over ``batches``.

    The LM head only sees the scored positions (a pre-hook gathers them): with a 49k vocabulary and long prompts
    the full ``[batch, seq, vocab]`` logits would cost more than the blocks.

    Raises:
        ValueError: a model without an LM head, or calibration data without a single scored token.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head; perplexity-based layer selection needs a causal LM.")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        targets = _targets(batch).to(device)
        keep = targets != IGNORE_INDEX  # [batch, seq − 1]
        if not keep.any():
            continue

        def gather(_module: nn.Module, args: tuple, keep: torch.Tensor = keep) -> tuple:
            return (args[0][:, :-1][keep].unsqueeze(0),)  # [1, scored tokens, hidden]

        handle = head.register_forward_pre_hook(gather)
        try:
            logits = model(**_inputs(model, batch, device)).logits[0]
        finally:
            handle.remove()
        total += float(F.cross_entropy(logits.float(), targets[keep], reduction="sum"))
        count += int(keep.sum())
    if count == 0:
        raise ValueError("calibration_data has no scored tokens (every label is -100); pass tokenized text.")
    return total / count


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
    ``(candidates + 1)(L − n)`` (why: on 2 CPU cores one pass of SmolLM2-135M over 800 tokens takes ~10-20 s).
    """
    kept = list(range(len(model.get_submodule(stack))))
    removed: list[int] = []
    after: list[float] = []  # calibration perplexity after each removal
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
    scores = {"removed_in_order": removed, "perplexity_after_each_removal": after, "candidates": candidates}
    return LayerChoice(kept, "greedy", {**scores, "calibration_perplexity": after[-1] if after else None})


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
