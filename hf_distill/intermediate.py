"""Hidden-state and attention matching between student and teacher layers (DistilBERT, TinyBERT, MiniLM)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_distill.config import DistillationConfig
from hf_distill.losses import attention_kl, hidden_state_loss, value_relation_kl
from hf_distill.student import find_layer_stack
from hf_distill.tasks import Task, unwrap_model

logger = logging.getLogger(__name__)
_VALUE_NAMES = ("value", "v_proj", "v_lin")


def default_layer_map(student_config: Any, teacher_layers: int) -> dict[int, int]:
    """Student hidden-state index -> teacher index (0 = embeddings, i = output of block i).

    A student made by :func:`create_student` maps each block to the teacher block it was copied from; otherwise
    blocks are spaced uniformly, student block i -> teacher block round(i · L_t / L_s).
    """
    student_layers = student_config.num_hidden_layers
    copied = getattr(student_config, "hf_distill_teacher_layers", None)
    if isinstance(copied, list) and len(copied) == student_layers and max(copied) < teacher_layers:
        return {i + 1: layer + 1 for i, layer in enumerate(copied)}
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


def _hidden_size(config: Any) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def _num_heads(config: Any) -> int | None:
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)


def resolve_attention_loss(name: str, student_config: Any, teacher_config: Any) -> str:
    """``attention_loss='auto'`` -> ``'value_relation'`` for a narrow student, else ``'attention_kl'``.

    A student of another width or head count (e.g. pruned by ``create_student(hidden_size=...)``) has attention
    maps that cannot be compared head by head (attention_kl would average them over heads), while MiniLM's
    [seq, seq] value relations split both sides into the same number of relation heads.
    """
    if name != "auto":
        return name
    same_width = _hidden_size(student_config) == _hidden_size(teacher_config)
    if same_width and _num_heads(student_config) == _num_heads(teacher_config):
        return "attention_kl"
    logger.info("attention_loss='auto': the student's width or head count differs, using MiniLM's value relation.")
    return "value_relation"


class IntermediateMatcher:
    """Computes `hidden_loss` and `attention_loss`; owns the student→teacher width projections."""

    ATTRIBUTE = "hf_distill_projections"

    def __init__(self, student: nn.Module, teacher: nn.Module, args: DistillationConfig, task: Task) -> None:
        self.args = args
        s_model, t_model = unwrap_model(student), unwrap_model(teacher)
        self.student_layers = s_model.config.num_hidden_layers
        self.teacher_layers = t_model.config.num_hidden_layers
        self.layer_map = args.layer_map or default_layer_map(s_model.config, self.teacher_layers)
        self.needs_hidden = args.hidden_loss_weight > 0
        use_attention = args.attention_loss_weight > 0
        self.attention_loss = resolve_attention_loss(args.attention_loss, s_model.config, t_model.config)
        self.needs_attentions = use_attention and self.attention_loss == "attention_kl"
        self.needs_values = use_attention and self.attention_loss == "value_relation"
        self.projections: nn.ModuleDict | None = None
        s_width, t_width = _hidden_size(s_model.config), _hidden_size(t_model.config)
        if self.needs_hidden and s_width != t_width:
            # A learned linear map per matched layer (TinyBERT's W_h); trained with the student, never saved with it.
            self.projections = nn.ModuleDict(
                {str(s): nn.Linear(s_width, t_width, bias=False) for s in sorted(self.layer_map)}
            )
        if self.needs_attentions:
            for model in (s_model, t_model):
                if getattr(model.config, "_attn_implementation", "eager") != "eager":
                    # Fused SDPA/flash kernels never materialise the attention map that this loss compares.
                    logger.info("Switching %s to eager attention to read attention maps.", type(model).__name__)
                    model.set_attn_implementation("eager")
        self.attention_pairs = self._attention_pairs()
        self._values: dict[str, dict[int, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._value_modules: dict[str, dict[int, nn.Module]] = {}
        self.relation_heads = 1
        if self.needs_values:
            self._value_modules = {
                "student": self._find_values(s_model, [s for s, _ in self.attention_pairs]),
                "teacher": self._find_values(t_model, [t for _, t in self.attention_pairs]),
            }
            # MiniLMv2 splits values into the same number of relation heads for both models, so that teacher and
            # student with different widths or head counts still compare [seq, seq] relations head by head.
            widths = [m.out_features for side in self._value_modules.values() for m in side.values()]
            self.relation_heads = math.gcd(s_model.config.num_attention_heads, *widths)

    def _attention_pairs(self) -> list[tuple[int, int]]:
        """(student block, teacher block), 1-based, whose attention is matched."""
        if self.args.attention_layers == "last":
            return [(self.student_layers, self.teacher_layers)]
        return [(s, t) for s, t in sorted(self.layer_map.items()) if s >= 1 and t >= 1]

    @staticmethod
    def _find_values(model: nn.Module, blocks: list[int]) -> dict[int, nn.Module]:
        stack = model.get_submodule(find_layer_stack(model, model.config.num_hidden_layers))
        found = {}
        for block in blocks:
            linear = [m for n, m in stack[block - 1].named_modules() if n.rsplit(".", 1)[-1] in _VALUE_NAMES]
            if not linear:
                raise ValueError(
                    f"attention_loss='value_relation' needs a separate value projection ({'/'.join(_VALUE_NAMES)}) "
                    f"in each block; {type(model).__name__} has none (e.g. GPT-2's fused c_attn). Use "
                    "attention_loss='attention_kl' instead."
                )
            found[block] = linear[0]
        return found

    @contextlib.contextmanager
    def capture_values(self, model: nn.Module, who: str) -> Iterator[None]:
        """Record the value projections' outputs of the matched blocks during one forward pass."""
        if not self.needs_values:
            yield
            return
        store = self._values[who]
        store.clear()
        handles = [
            module.register_forward_hook(lambda _m, _i, out, block=block: store.__setitem__(block, out))
            for block, module in self._value_modules[who].items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def losses(
        self, student_out: Any, teacher_out: Any, attention_mask: torch.Tensor | None, student_offset: int = 0
    ) -> dict[str, torch.Tensor]:
        """Per-token layer losses ``[batch, seq]``, averaged over the matched layer pairs (heads for attention).

        Values at padded tokens are meaningless; the trainer sums the tokens the attention mask keeps and divides
        by their number over the whole accumulated batch. ``student_offset`` skips a prompt-learning student's
        leading virtual positions.
        """
        result: dict[str, torch.Tensor] = {}
        if self.needs_hidden:
            terms = []
            for s, t in sorted(self.layer_map.items()):
                s_hidden = student_out.hidden_states[s][:, student_offset:]
                if self.projections is not None:
                    s_hidden = self.projections[str(s)](s_hidden)
                teacher_hidden = teacher_out.hidden_states[t]
                terms.append(hidden_state_loss(s_hidden, teacher_hidden, loss=self.args.hidden_loss, reduction="none"))
            result["hidden_loss"] = torch.stack(terms).mean(0)
        if self.needs_attentions:
            terms = [
                attention_kl(student_out.attentions[s - 1], teacher_out.attentions[t - 1], key_mask=attention_mask)
                for s, t in self.attention_pairs
            ]
            result["attention_loss"] = torch.stack(terms).mean(0)
        if self.needs_values:
            terms = [
                value_relation_kl(
                    self._heads(self._values["student"][s]),
                    self._heads(self._values["teacher"][t]),
                    key_mask=attention_mask,
                )
                for s, t in self.attention_pairs
            ]
            result["attention_loss"] = torch.stack(terms).mean(0)
        return result

    def _heads(self, values: torch.Tensor) -> torch.Tensor:
        """[batch, seq, width] -> [batch, relation_heads, seq, width / relation_heads]."""
        batch, seq, width = values.shape
        return values.view(batch, seq, self.relation_heads, width // self.relation_heads).transpose(1, 2)
