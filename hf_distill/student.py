"""`create_student`: cut a smaller student out of a teacher: fewer layers (DistilBERT), narrower (Minitron)."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_distill.depth import LayerChoice, resolve_method, select_layers
from hf_distill.pruning import (
    FAMILIES,
    Family,
    Importance,
    KeptUnits,
    Widths,
    activation_importance,
    calibration_batches,
    choose_units,
    prune_state,
    slicing_rules,
    weight_importance,
)

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


def family_for(config: Any) -> Family:
    """The projection layout of a width-prunable architecture. Raises ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"Width pruning (hidden_size, intermediate_size, num_attention_heads) supports model_type "
            f"{', '.join(sorted(FAMILIES))} (BERT-, RoBERTa- and Llama/Qwen2/Mistral-style models); got "
            f"{model_type!r}. Layer dropping alone (num_layers / layers) works for it."
        )
    return FAMILIES[model_type]


def model_widths(config: Any, family: Family) -> Widths:
    """The teacher's widths; BERT's head size is hidden_size / heads, a decoder's is its ``head_dim``."""
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    if not family.attention_is_hidden:
        head_dim = getattr(config, "head_dim", None) or head_dim
    kv_heads = heads if family.attention_is_hidden else (getattr(config, "num_key_value_heads", None) or heads)
    return Widths(config.hidden_size, config.intermediate_size, heads, kv_heads, head_dim)


def _check_sizes(teacher: Widths, requested: dict[str, int | None]) -> None:
    limits = {
        "hidden_size": teacher.hidden,
        "intermediate_size": teacher.intermediate,
        "num_attention_heads": teacher.heads,
        "num_key_value_heads": teacher.kv_heads,
    }
    for name, value in requested.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits[name]
        ):
            raise ValueError(
                f"{name} must be an int in [1, {limits[name]}] (the teacher's {name} is {limits[name]}; pruning only "
                f"removes units), got {value!r}."
            )


def _decoder_heads(teacher: Widths, heads: int | None, kv_heads: int | None) -> tuple[int, int]:
    """(query heads, key/value heads) of a GQA student; query heads per key/value head may shrink, never grow."""
    heads = heads or teacher.heads
    group = teacher.heads // teacher.kv_heads
    if kv_heads is None:
        if heads % group:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of the teacher's {group} query heads per key/value "
                f"head; pass num_key_value_heads too (a divisor of {heads}, at most {teacher.kv_heads})."
            )
        kv_heads = heads // group  # keep the teacher's GQA ratio
    if heads % kv_heads or heads // kv_heads > group:
        raise ValueError(
            f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}, with at most the "
            f"teacher's {group} query heads per key/value head: pruning keeps whole key/value heads and the query "
            "heads of their groups, it cannot merge groups."
        )
    return heads, kv_heads


def student_widths(
    teacher: Widths,
    family: Family,
    hidden_size: int | None,
    intermediate_size: int | None,
    num_attention_heads: int | None,
    num_key_value_heads: int | None,
) -> Widths:
    """Check the requested widths against the teacher's and fill the defaults.

    The head size always stays the teacher's (its weights are copied whole). BERT/RoBERTa: the attention width is
    hidden_size, so num_attention_heads defaults to hidden_size / head size and must equal it. Llama/Qwen2/Mistral:
    heads default to the teacher's, key/value heads to the teacher's ratio. intermediate_size defaults to the
    teacher's, scaled by hidden_size / teacher hidden_size when hidden_size is given.

    Raises:
        ValueError: a size larger than the teacher's or not a positive int, or heads that do not fit.
    """
    _check_sizes(
        teacher,
        {
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
        },
    )
    hidden = hidden_size or teacher.hidden
    if family.attention_is_hidden:
        if num_key_value_heads is not None:
            raise ValueError(
                "num_key_value_heads is for GQA decoders (Llama, Qwen2, Mistral); BERT-style models "
                "have one key/value head per query head."
            )
        heads = num_attention_heads or hidden // teacher.head_dim
        if heads * teacher.head_dim != hidden:
            example = max(teacher.head_dim, hidden // teacher.head_dim * teacher.head_dim)
            raise ValueError(
                f"BERT-style attention is hidden_size wide, so num_attention_heads × the teacher's head size "
                f"({teacher.head_dim}) must equal hidden_size={hidden}; got {heads} heads. Use a hidden_size that "
                f"is a multiple of {teacher.head_dim} (e.g. {example}) and leave num_attention_heads unset."
            )
        kv_heads = heads
    else:
        heads, kv_heads = _decoder_heads(teacher, num_attention_heads, num_key_value_heads)
    intermediate = intermediate_size or (
        teacher.intermediate if hidden_size is None else max(1, round(teacher.intermediate * hidden / teacher.hidden))
    )
    return Widths(hidden, intermediate, heads, kv_heads, teacher.head_dim)


def _resolve_layers(teacher_layers: int, num_layers: int | None, layers: list[int] | None, widths: bool) -> list[int]:
    if num_layers is None and layers is None and widths:
        return list(range(teacher_layers))  # width pruning alone keeps every block
    if (num_layers is None) == (layers is None):
        raise ValueError(
            "Pass exactly one of num_layers (uniform choice) or layers (explicit teacher indices); to prune only "
            "the width, pass hidden_size / intermediate_size / num_attention_heads alone."
        )
    if layers is None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= teacher_layers:
            raise ValueError(
                f"num_layers must be an int in [1, {teacher_layers}] (the teacher's depth), got {num_layers}."
            )
        layers = choose_layers(teacher_layers, num_layers)
    layers = list(layers)
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= teacher_layers:
        raise ValueError(
            f"layers must be strictly increasing teacher layer indices in [0, {teacher_layers - 1}], got {layers}."
        )
    return layers


def _cut_layers(teacher: PreTrainedModel, stack: str, layers: list[int]) -> PreTrainedModel:
    """The teacher's class with only ``layers`` (0-based) in its block stack, every weight copied."""
    teacher_layers = teacher.config.num_hidden_layers
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
    return student


def _narrow(
    cut: PreTrainedModel, stack: str, family: Family, kept: KeptUnits, teacher: Widths, widths: Widths
) -> PreTrainedModel:
    """A model of the narrower config whose weights are ``cut``'s, sliced to the kept units."""
    config = copy.deepcopy(cut.config)
    config.hidden_size, config.intermediate_size = widths.hidden, widths.intermediate
    config.num_attention_heads = widths.heads
    if not family.attention_is_hidden:
        config.num_key_value_heads, config.head_dim = widths.kv_heads, widths.head_dim
    student = type(cut)(config).to(dtype=next(cut.parameters()).dtype)
    state = prune_state(cut.state_dict(), slicing_rules(cut, stack, family, kept, teacher))
    expected = student.state_dict()
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:  # a config field this architecture sizes from that create_student does not set
        raise ValueError(f"Pruned weights do not fit the narrow {type(cut).__name__}: {wrong[:3]}.")
    student.load_state_dict(state, strict=True)
    return student


def _importance(
    teacher: PreTrainedModel,
    stack: str,
    family: Family,
    widths: Widths,
    calibration_data: Any,
    batch_size: int,
    max_batches: int,
) -> Importance:
    """Activation importance on the calibration batches, or weight magnitude (with a warning) without them."""
    blocks = teacher.get_submodule(stack)
    if calibration_data is None:
        logger.warning(
            "create_student: no calibration_data, so heads, MLP neurons and hidden channels are ranked by weight "
            "magnitude; pass calibration_data (a few hundred tokenized examples) for activation importance."
        )
        return weight_importance(teacher, blocks, family, widths)
    pad = getattr(teacher.config, "pad_token_id", None)
    batches = calibration_batches(calibration_data, teacher, pad or 0, batch_size, max_batches)
    return activation_importance(teacher, blocks, family, widths, batches)


def _choose_layers(
    teacher: PreTrainedModel,
    num_layers: int | None,
    layers: list[int] | None,
    method: str,
    prune: bool,
    calibration: tuple[Any, int, int],
) -> LayerChoice:
    """The kept teacher blocks: explicit, uniform, or measured on the calibration data (``method``)."""
    teacher_layers = teacher.config.num_hidden_layers
    if method == "uniform":
        return LayerChoice(_resolve_layers(teacher_layers, num_layers, layers, prune), "uniform")
    _resolve_layers(teacher_layers, num_layers, None, prune)  # range check of num_layers before measuring
    data, batch_size, max_batches = calibration
    pad = getattr(teacher.config, "pad_token_id", None)
    batches = calibration_batches(data, teacher, pad or 0, batch_size, max_batches, labels=True)
    stack = find_layer_stack(teacher, teacher_layers)
    return select_layers(teacher, stack, num_layers, method, batches)


def create_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    *,
    layer_selection: str | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    calibration_data: Any = None,
    num_calibration_batches: int = 32,
    calibration_batch_size: int = 16,
) -> PreTrainedModel:
    """Build a smaller student initialised from the teacher: fewer layers, and optionally narrower.

    Depth: the student is the teacher's own class with ``num_hidden_layers`` reduced; it copies the embeddings,
    the chosen blocks and everything after the block stack (Sanh et al. 2019 showed this initialisation matters).
    The blocks are ``layers`` (0-based teacher indices) or ``num_layers`` of them chosen by ``layer_selection``
    (:mod:`hf_distill.depth`): ``"uniform"`` (evenly spaced), ``"block_influence"`` (ShortGPT),
    ``"contiguous"``, ``"greedy"`` or ``"importance"`` (perplexity on the calibration data; causal LMs). The default
    is ``"importance"`` for a causal LM given ``calibration_data``, else ``"uniform"``. The kept blocks are logged
    and saved in the config (``hf_distill_teacher_layers``, ``hf_distill_layer_selection``).

    Width (BERT, RoBERTa, Llama, Qwen2, Mistral): ``hidden_size``, ``intermediate_size``, ``num_attention_heads``
    (and for GQA ``num_key_value_heads``) below the teacher's prune it structurally after the layer choice,
    Minitron-style (Muralidharan et al. 2024): hidden channels, MLP neurons and heads are ranked by activation
    importance, measured on the whole teacher (the chosen blocks then use their own scores); the most important are
    kept and their weights copied — embeddings, norms, pooler and head included. Without calibration data the
    ranking is by weight magnitude (logged as a warning). Defaults: see :func:`student_widths`.

    ``calibration_data`` is a tokenized ``datasets.Dataset`` or a list of dicts of tensors (at most
    ``num_calibration_batches`` batches of ``calibration_batch_size`` rows); per-token ``labels`` (e.g. the
    response tokens of :func:`hf_distill.chat.tokenize_chat`) decide which tokens layer selection scores. Greedy
    selection runs about ``(L + n)(L − n) / 2`` passes over it (L teacher blocks, n kept): a few dozen rows suffice.
    The result is a plain model of the smaller config: it saves, loads and exports like any other.

    Raises:
        ValueError: not a PreTrainedModel, meta weights, bad layer choice or layer_selection, sizes larger than the
            teacher's or heads that do not fit, an architecture width pruning does not support, unusable
            calibration data.
    """
    if not isinstance(teacher, PreTrainedModel):
        raise ValueError(f"create_student needs a transformers PreTrainedModel, got {type(teacher).__name__}.")
    if any(p.is_meta for p in teacher.parameters()):
        raise ValueError("The teacher's weights are on the meta device; load it with real weights first.")
    teacher_layers = _num_layers(teacher.config)
    requested = (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)
    prune = any(v is not None for v in requested)
    method = resolve_method(teacher, num_layers, layers, layer_selection, calibration_data)
    if not prune and calibration_data is not None and method == "uniform":
        raise ValueError(
            "calibration_data ranks units for width pruning and, for causal LMs, layers; pass hidden_size, "
            "intermediate_size or num_attention_heads, or a layer_selection other than 'uniform', with it "
            "(uniform layer dropping needs no calibration)."
        )
    widths = _widths(teacher, requested) if prune else None  # checked before any measurement
    calibration = (calibration_data, calibration_batch_size, num_calibration_batches)
    choice = _choose_layers(teacher, num_layers, layers, method, prune, calibration)
    layers = choice.layers
    stack = find_layer_stack(teacher, teacher_layers)
    selection = {"method": choice.method, **choice.scores}
    if not prune:
        logger.info("Created a %d-layer student from teacher layers %s (%s)", len(layers), layers, choice.method)
        student = _cut_layers(teacher, stack, layers)
        student.config.hf_distill_layer_selection = selection
        return student
    student = _prune_width(teacher, stack, layers, widths, calibration)
    student.config.hf_distill_layer_selection = selection
    return student


def _widths(teacher: PreTrainedModel, requested: tuple[int | None, ...]) -> tuple[Family, Widths, Widths]:
    """(projection layout, teacher widths, student widths) of a width-pruning request; ValueError if it cannot be."""
    family = family_for(teacher.config)
    t_widths = model_widths(teacher.config, family)
    return family, t_widths, student_widths(t_widths, family, *requested)


def _prune_width(
    teacher: PreTrainedModel,
    stack: str,
    layers: list[int],
    widths: tuple[Family, Widths, Widths],
    calibration: tuple[Any, int, int],
) -> PreTrainedModel:
    """``layers`` of the teacher, narrowed to the student ``widths`` by importance."""
    family, t_widths, s_widths = widths
    data, batch_size, max_batches = calibration
    importance = _importance(teacher, stack, family, t_widths, data, batch_size, max_batches)
    kept = choose_units(importance.select(layers), t_widths, s_widths)
    student = _narrow(_cut_layers(teacher, stack, layers), stack, family, kept, t_widths, s_widths)
    student.config.hf_distill_pruning = {"importance": importance.source, "teacher_hidden_size": t_widths.hidden}
    logger.info(
        "Created a %d-layer student from teacher layers %s, pruned to hidden %d, intermediate %d, %d heads "
        "(%d key/value) by %s importance",
        len(layers),
        layers,
        s_widths.hidden,
        s_widths.intermediate,
        s_widths.heads,
        s_widths.kv_heads,
        importance.source,
    )
    return student
