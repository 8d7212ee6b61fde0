"""How a batch reaches a model: only the inputs it takes, positions and pooling decided by the attention mask.

Every place where hf_distill runs a model on its own batches (the student and the teacher in training, evaluation
and ``predict``, ``cache_teacher_logits``, accuracy loops) goes through :func:`run_model`, so that

- a batch holding the union of what student and teacher take (e.g. ``token_type_ids`` for a BERT teacher and a
  DistilBERT student) gives each model only its own inputs, and never the labels (hf_distill computes the losses);
- a decoder-only model (GPT-2, Llama, ...) without ``position_ids`` in the batch gets them from the attention mask,
  so a left-padded row gives what it gives right-padded (absolute position embeddings would otherwise shift);
- a decoder classifier scores the last *attended* position, also when it reads ``inputs_embeds`` (PEFT soft
  prompts) or its config has no ``pad_token_id``.

Positions and pooling are applied by hooks on the transformers model inside any DDP/PEFT wrapper, because that is
where the full attention mask (including PEFT's virtual positions) and the per-position scores exist; the model is
still called through its outermost wrapper, so DDP's gradient synchronisation and PEFT's prompts keep working.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from hf_distill.prompts import num_virtual_tokens
from hf_distill.tasks import (
    Task,
    infer_task,
    is_decoder_only,
    last_attended_position,
    pools_last_token,
    position_ids_from_mask,
    unwrap_model,
)

# Targets: hf_distill computes every loss itself, so a model never gets them (it would compute a loss of its own).
LABEL_KEYS = frozenset({"labels", "label", "label_ids"})


def _named_parameters(module: nn.Module) -> set[str]:
    """Named (not ``*args`` / ``**kwargs``) parameters of ``module.forward``."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # builtins or C-implemented forwards: nothing to learn
        return set()
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def accepted_inputs(model: nn.Module) -> frozenset[str]:
    """Inputs ``model`` takes by name: those of its forward and of every wrapper down to the transformers model.

    A PEFT model adds ``task_ids`` to its base model's inputs; DDP and Accelerate wrappers add none. transformers 5
    forwards end in ``**kwargs``, which swallow unknown names silently (DistilBERT ignores ``token_type_ids``), so
    only named parameters count, as in ``Trainer._set_signature_columns_if_needed``.
    """
    names: set[str] = set()
    current: nn.Module | None = model
    while current is not None:
        names |= _named_parameters(current)
        inner = getattr(current, "module", None)
        current = inner if isinstance(inner, nn.Module) else None
    return frozenset(names | _named_parameters(unwrap_model(model)))


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``model`` accepts, without labels."""
    accepted = accepted_inputs(model)
    return {k: v for k, v in batch.items() if k in accepted and k not in LABEL_KEYS}


def run_model(model: nn.Module, batch: Mapping[str, Any], **options: Any) -> Any:
    """``model(**inputs, **options)`` with the inputs it accepts and attention-mask-driven positions and pooling.

    ``options`` (``output_hidden_states``, ``use_cache``, ...) are passed as they are. Returns the model's output.
    """
    with mask_driven(model):
        return model(**model_inputs(model, batch), **options)


@contextlib.contextmanager
def mask_driven(model: nn.Module) -> Iterator[None]:
    """While active, the decoder-only transformers model inside ``model`` takes positions and pooling from the mask.

    A pre-hook on its backbone records the attention mask it receives (with PEFT's virtual positions, which PEFT
    prepends) and, when no ``position_ids`` are given, adds :func:`position_ids_from_mask` for the backbone's own
    positions (the last ``seq`` columns: prefix tuning keeps its virtual positions in the cache). For decoder
    classifiers a hook on the ``score`` head puts the score of the last attended position at every position, so
    whichever position transformers then picks is the right one. Encoders are left alone.
    """
    base = unwrap_model(model)
    if not is_decoder_only(base):
        yield
        return
    backbone = getattr(base, "base_model", base)  # PreTrainedModel: the body under the head (GPT2Model, ...)
    takes_positions = "position_ids" in _named_parameters(backbone)
    seen: dict[str, torch.Tensor | None] = {"mask": None}

    def before_backbone(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        mask = kwargs.get("attention_mask")
        seen["mask"] = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        if seen["mask"] is not None and takes_positions and kwargs.get("position_ids") is None:
            tokens = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("input_ids")
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            if tokens is not None:
                kwargs["position_ids"] = position_ids_from_mask(seen["mask"])[:, -tokens.shape[1] :]
        return args, kwargs

    def after_score(module: nn.Module, args: tuple, scores: torch.Tensor) -> torch.Tensor:
        mask = seen["mask"]
        if mask is None or scores.dim() != 3:
            return scores
        last = last_attended_position(mask[:, -scores.shape[1] :]).to(scores.device)
        picked = scores[torch.arange(scores.shape[0], device=scores.device), last]
        return picked[:, None, :].expand_as(scores)

    handles = [backbone.register_forward_pre_hook(before_backbone, with_kwargs=True)]
    pooling = pools_last_token(base)
    if pooling:
        handles.append(base.score.register_forward_hook(after_score))
    with _pad_id_for_pooling(base) if pooling else contextlib.nullcontext():
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _pad_id_for_pooling(model: nn.Module) -> Iterator[None]:
    """Give a decoder classifier without ``pad_token_id`` a placeholder one for the duration of a forward.

    transformers refuses batches of more than one row without a pad id, because it would find the last token
    through it; the ``score`` hook of :func:`mask_driven` finds it from the attention mask instead, so any value
    does. The config is restored afterwards (a saved model keeps the user's config).
    """
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    missing = [c for c in configs if getattr(c, "pad_token_id", None) is None]
    for config in missing:
        config.pad_token_id = -1  # never a real id: no token is mistaken for padding
    try:
        yield
    finally:
        for config in missing:
            config.pad_token_id = None


def input_position_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logits on the input's own positions: a prompt-learning PEFT model's virtual positions dropped.

    Per-token tasks (token classification, causal LM) give ``[batch, virtual + seq, classes]``; the result is
    ``[batch, seq, classes]``. Sequence classification logits ``[batch, classes]`` are returned as they are.
    """
    virtual = num_virtual_tokens(model)
    if virtual and infer_task(model) is not Task.SEQUENCE_CLASSIFICATION:
        return logits[:, virtual:]
    return logits
