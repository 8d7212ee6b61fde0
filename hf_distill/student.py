"""`create_student`: cut a smaller student out of a teacher, DistilBERT-style."""

from __future__ import annotations

import copy
import logging
import re

import torch
from torch import nn
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def find_layer_stack(model: nn.Module, num_layers: int) -> str:
    """Return the dotted name of the `nn.ModuleList` holding the model's transformer blocks.

    Found by introspection rather than a per-architecture table, so it covers BERT/RoBERTa (`encoder.layer`),
    DistilBERT (`transformer.layer`), Llama/Qwen2/Mistral (`model.layers`) and GPT-2 (`transformer.h`) alike.
    """
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and len({type(block) for block in module}) == 1
        and sum(p.numel() for p in module[0].parameters()) > 0
    ]
    if not candidates:
        raise ValueError(
            f"Cannot cut {type(model).__name__}: no list of {num_layers} identical blocks (config.num_hidden_layers) "
            "was found. create_student supports models whose blocks sit in one nn.ModuleList (BERT, RoBERTa, "
            "DistilBERT, Llama, Qwen2, Mistral, GPT-2, ...); build this student yourself and pass it to "
            "DistillationTrainer."
        )
    # The outermost list is the block stack; nested lists (e.g. per-block experts) come later in named_modules.
    return candidates[0]


def _num_layers(config: object) -> int:
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise ValueError(
            f"Cannot cut a {type(config).__name__}: its config has no integer num_hidden_layers. create_student "
            "supports single-stack encoder and decoder models."
        )
    return layers


def choose_layers(teacher_layers: int, num_layers: int) -> list[int]:
    """Uniformly spaced teacher layers, always keeping the first and the last (DistilBERT keeps every other)."""
    if num_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (num_layers - 1)
    return sorted({round(i * step) for i in range(num_layers)})


def create_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: list[int] | None = None,
) -> PreTrainedModel:
    """Build a student with a subset of the teacher's layers, initialised from the teacher.

    The student is the teacher's own class with ``num_hidden_layers`` reduced. It copies the teacher's embeddings,
    the chosen blocks (``layers``, 0-based teacher indices, or ``num_layers`` uniformly spaced ones) and everything
    after the block stack (final norm, pooler, task head). Sanh et al. (2019) showed this initialisation matters
    for the student's final quality.
    """
    if not isinstance(teacher, PreTrainedModel):
        raise ValueError(f"create_student needs a transformers PreTrainedModel, got {type(teacher).__name__}.")
    if any(p.is_meta for p in teacher.parameters()):
        raise ValueError("The teacher's weights are on the meta device; load it with real weights first.")
    teacher_layers = _num_layers(teacher.config)
    if (num_layers is None) == (layers is None):
        raise ValueError("Pass exactly one of num_layers (uniform choice) or layers (explicit teacher indices).")
    if layers is None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= teacher_layers:
            raise ValueError(
                f"num_layers must be an int in [1, {teacher_layers}] (the teacher's depth), got {num_layers}."
            )
        layers = choose_layers(teacher_layers, num_layers)
    layers = list(layers)
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= teacher_layers:
        raise ValueError(
            f"layers must be strictly increasing teacher layer indices in [0, {teacher_layers - 1}], got {layers}."
        )
    stack = find_layer_stack(teacher, teacher_layers)

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    # Per-layer settings (e.g. Qwen2's layer_types) must follow the chosen layers.
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == teacher_layers and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    student = type(teacher)(config).to(dtype=next(teacher.parameters()).dtype)

    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.(.*)$")
    teacher_state = teacher.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for key in student.state_dict():
        match = pattern.match(key)
        source = f"{stack}.{layers[int(match.group(1))]}.{match.group(2)}" if match else key
        if source not in teacher_state:
            raise ValueError(f"Cannot map student weight {key!r} to the teacher (looked for {source!r}).")
        new_state[key] = teacher_state[source].detach().clone()
    student.load_state_dict(new_state, strict=True)
    student.config.hf_distill_teacher_layers = layers
    logger.info("Created a %d-layer student from teacher layers %s", len(layers), layers)
    return student
