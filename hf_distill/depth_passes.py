"""Forward passes that depth pruning measures: a shortened block stack, block influence, calibration perplexity,
and passes that replay a stack from cached block inputs (what makes greedy removal cheap).

Replay: removing block p of a stack changes nothing before p, and the block after p then receives exactly the input
block p received. :func:`recorded_pass` keeps every block's input per calibration batch; a candidate removal runs
only the blocks after p, with a stand-in (:class:`_Replay`) in p's place that returns p's cached input. The same
pass records the inputs and block influence of every later block, which is the cache of the shortened model if that
candidate is chosen. The tensors are the ones a full pass computes (same kernels, same inputs), so the measured
perplexities equal those of full passes (``tests/test_layer_selection.py``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_distill.tasks import IGNORE_INDEX


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


def _influence_hook(index: int, sums: list[float], state: dict[str, Any], inputs: list[list] | None = None) -> Any:
    """A forward hook adding block ``index``'s ``Σ (1 − cos(input, output))`` over real tokens to ``sums[index]``
    (``state["mask"]``: the batch's attention mask); with ``inputs``, it also keeps the block's input tensor."""

    def record(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
        y = output[0] if isinstance(output, tuple) else output
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # [batch, seq]
        sums[index] += float(((1 - cos) * state["mask"]).sum())
        if inputs is not None:
            inputs[index].append(x.detach().clone())  # a later in-place op in some block must not change it

    return record


def _mask(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    return batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float().to(device)


@torch.no_grad()
def block_influence(model: nn.Module, stack: str, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """ShortGPT block influence ``1 − cos(input, output)`` of every block, mean over real tokens; [num_blocks]."""
    blocks = model.get_submodule(stack)
    sums, state = [0.0] * len(blocks), {}
    handles = [b.register_forward_hook(_influence_hook(i, sums, state), with_kwargs=True) for i, b in enumerate(blocks)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # the logits are not needed: the LM head sees one position (a 49k vocabulary costs ~20 %)
        handles.append(head.register_forward_pre_hook(lambda _m, args: (args[0][:, :1],)))
    device, tokens = next(model.parameters()).device, 0.0
    try:
        for batch in batches:
            state["mask"] = _mask(batch, device)
            tokens += float(state["mask"].sum())
            model(**_inputs(model, batch, device))
    finally:
        for handle in handles:
            handle.remove()
    return [s / tokens for s in sums]


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


def _batch_nll(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, forward_unscored: bool = False
) -> tuple[float, int]:
    """Summed next-token NLL of one batch (nats) and its number of scored tokens. The LM head only sees the scored
    positions (a pre-hook gathers them): with a 49k vocabulary and long prompts the full ``[batch, seq, vocab]``
    logits would cost more than the blocks. A batch without scored tokens gives ``(0, 0)`` without a forward pass,
    or with one when ``forward_unscored`` (its hidden states are recorded)."""
    targets = _targets(batch).to(device)
    keep = targets != IGNORE_INDEX  # [batch, seq − 1]
    scored = bool(keep.any())
    if not scored and not forward_unscored:
        return 0.0, 0

    def gather(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0][:, :-1]
        return (hidden[keep].unsqueeze(0) if scored else hidden[:, :1],)  # [1, scored tokens, hidden]

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        logits = model(**_inputs(model, batch, device)).logits[0]
    finally:
        handle.remove()
    if not scored:
        return 0.0, 0
    return float(F.cross_entropy(logits.float(), targets[keep], reduction="sum")), int(keep.sum())


def _lm_head_or_raise(model: nn.Module) -> None:
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no LM head; perplexity-based layer selection needs a causal LM.")


def _mean_nll(total: float, count: int) -> float:
    if count == 0:
        raise ValueError("calibration_data has no scored tokens (every label is -100); pass tokenized text.")
    return total / count


@torch.no_grad()
def calibration_nll(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token negative log-likelihood (nats per scored token) of a causal LM over ``batches``.

    Raises:
        ValueError: a model without an LM head, or calibration data without a single scored token.
    """
    _lm_head_or_raise(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        nll, scored = _batch_nll(model, batch, device)
        total, count = total + nll, count + scored
    return _mean_nll(total, count)


class _Replay(nn.Module):
    """Stands in for a removed block: returns that block's cached input for the current batch, so the next block
    receives exactly what it receives once the block is gone."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.inputs = inputs
        self.batch = 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inputs[self.batch]


@dataclass
class Recording:
    """What :func:`recorded_pass` measured: the mean calibration NLL (nats per scored token), and for every real
    block of the pass its input per batch (``inputs[block][batch]``, ``[batch, seq, hidden]``) and block influence."""

    nll: float
    inputs: list[list[torch.Tensor]]
    influence: list[float]


@torch.no_grad()
def recorded_pass(
    model: nn.Module,
    stack: str,
    layers: list[int],
    batches: list[dict[str, torch.Tensor]],
    replay: list[torch.Tensor] | None = None,
) -> Recording:
    """One pass of the stack made of teacher blocks ``layers`` over ``batches``, recording each block's input and
    block influence; with ``replay`` (per-batch hidden states) the first of ``layers`` is a stand-in returning them.

    Raises:
        ValueError: a model without an LM head, or calibration data without a single scored token.
    """
    _lm_head_or_raise(model)
    device = next(model.parameters()).device
    with only_blocks(model, stack, layers):
        blocks = model.get_submodule(stack)
        stand_in = None if replay is None else _Replay(replay)
        if stand_in is not None:
            blocks[0] = stand_in  # only the temporary stack of only_blocks changes
        real = list(blocks)[0 if stand_in is None else 1 :]
        inputs: list[list[torch.Tensor]] = [[] for _ in real]
        sums, state = [0.0] * len(real), {}
        hooks = [
            b.register_forward_hook(_influence_hook(i, sums, state, inputs), with_kwargs=True)
            for i, b in enumerate(real)
        ]
        total, count, tokens = 0.0, 0, 0.0
        try:
            for index, batch in enumerate(batches):
                if stand_in is not None:
                    stand_in.batch = index
                state["mask"] = _mask(batch, device)
                tokens += float(state["mask"].sum())
                nll, scored = _batch_nll(model, batch, device, forward_unscored=True)
                total, count = total + nll, count + scored
        finally:
            for hook in hooks:
                hook.remove()
    return Recording(_mean_nll(total, count), inputs, [s / tokens for s in sums])


def replay_bytes(model: nn.Module, batches: list[dict[str, torch.Tensor]], blocks: int, candidates: int) -> int:
    """Upper bound of the memory greedy removal with replay holds: block inputs of the current stack and of each
    candidate's pass, ``(1 + candidates) · blocks · tokens · hidden`` values of the model's dtype."""
    parameter = next(model.parameters())
    hidden = model.config.get_text_config().hidden_size
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return (1 + candidates) * blocks * tokens * hidden * parameter.element_size()
