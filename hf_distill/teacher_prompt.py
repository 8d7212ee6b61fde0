"""Prompt (context) distillation: a hand-written prompt in the teacher's input, none in the student's.

Two placements (``DistillationConfig.teacher_prompt_as``):

- ``"prefix"``: the prompt's tokens go in front of every input, after a leading special token ([CLS] / <bos>) when
  the tokenizer adds one (classifiers, plain-text causal LMs).
- ``"system"``: chat models. The prompt becomes the chat template's system message. The student's rows (rendered
  without a system message, e.g. by :func:`hf_distill.chat.tokenize_chat`) start with whatever the template puts
  there by itself (SmolLM2 adds a default system turn; many templates nothing); the teacher's input has that block
  replaced by the system turn with the prompt. Both blocks are found by rendering a probe conversation both ways
  (common prefix and suffix of the two renderings).

For causal LMs the teacher's logits are realigned to the student's positions afterwards, so that the teacher's
prediction of every student token after the prompt block is compared with the student's (Askell et al. 2021,
"context distillation"; Snell et al. 2022, "Learning by distilling context").
"""

from __future__ import annotations

from typing import Any

import torch

PLACEMENTS = ("prefix", "system")
_PROBE = [{"role": "user", "content": "Hello."}]


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def _system_blocks(text: str, tokenizer: Any) -> tuple[int, list[int], list[int]]:
    """``(start, default block, prompt block)``: where the two renderings of a probe conversation differ."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("teacher_prompt_as='system' needs a tokenizer with a chat template; use 'prefix'.")
    plain = _chat_ids(tokenizer, _PROBE)
    prompted = _chat_ids(tokenizer, [{"role": "system", "content": text}, *_PROBE])
    start = 0
    while start < min(len(plain), len(prompted)) and plain[start] == prompted[start]:
        start += 1
    end = 0
    while end < min(len(plain), len(prompted)) - start and plain[-1 - end] == prompted[-1 - end]:
        end += 1
    return start, plain[start : len(plain) - end], prompted[start : len(prompted) - end]


class TeacherPrompt:
    """The hand-written prompt the teacher reads and the student does not (see the module docstring).

    ``ids`` is the block the teacher reads at ``insert_at`` instead of the student's ``replaced`` tokens (none for
    ``"prefix"``); ``length`` is how many more tokens the teacher reads per input (what the student saves).

    Raises:
        ValueError: an unknown placement; ``"system"`` with a tokenizer without a chat template, or whose
            template ignores system messages.
    """

    def __init__(self, text: str, tokenizer: Any, placement: str = "prefix") -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"teacher_prompt_as must be one of {PLACEMENTS}, got {placement!r}.")
        if placement == "system":
            self.insert_at, replaced, ids = _system_blocks(text, tokenizer)
            if not ids or len(ids) <= len(replaced):
                raise ValueError(
                    "The chat template does not put the system message into the input (its rendering with the "
                    "prompt is no longer than without): use teacher_prompt_as='prefix'."
                )
        else:
            ids, replaced = tokenizer(text, add_special_tokens=False)["input_ids"], []
            probe = tokenizer("x")["input_ids"]
            self.insert_at = 1 if probe and probe[0] in set(tokenizer.all_special_ids) else 0
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.replaced = torch.tensor(replaced, dtype=torch.long)
        self.length = int(self.ids.numel() - self.replaced.numel())

    def prepend(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The teacher's inputs: the prompt block in, the student's replaced block out (right padding needed).

        Raises:
            ValueError: left-padded batches; rows without the replaced block where it belongs; labels on it.
        """
        mask = inputs.get("attention_mask")
        if mask is not None and bool((mask[:, 0] == 0).any()):
            raise ValueError("teacher_prompt needs right-padded batches (the tokenizer's padding_side='right').")
        a, d, batch = self.insert_at, int(self.replaced.numel()), inputs["input_ids"].shape[0]
        if d:
            self._check_replaced(inputs)
        p = int(self.ids.numel())
        fills = {"input_ids": self.ids.to(inputs["input_ids"].device), "attention_mask": 1, "token_type_ids": 0}
        # The student's position ids do not fit the longer teacher input: run_model derives the teacher's from
        # the prompted attention mask.
        result = {key: value for key, value in inputs.items() if key != "position_ids"}
        for key, fill in fills.items():
            if key not in inputs:
                continue
            tensor = inputs[key]
            middle = (
                fill.expand(batch, -1)
                if torch.is_tensor(fill)
                else torch.full((batch, p), fill, dtype=tensor.dtype, device=tensor.device)
            )
            result[key] = torch.cat([tensor[:, :a], middle, tensor[:, a + d :]], dim=1)
        return result

    def _check_replaced(self, inputs: dict[str, Any]) -> None:
        a, d = self.insert_at, int(self.replaced.numel())
        ids = inputs["input_ids"]
        block = self.replaced.to(ids.device)
        if ids.shape[1] < a + d or not bool((ids[:, a : a + d] == block).all()):
            raise ValueError(
                "teacher_prompt_as='system': a row does not start with the chat template's own opening (rendered "
                "without a system message); tokenize the rows with tokenize_chat and no system_prompt."
            )
        labels = inputs.get("labels")
        if labels is not None and bool((labels[:, a : a + d] != -100).any()):
            raise ValueError(
                "teacher_prompt_as='system' replaces the template's opening block, whose tokens the teacher never "
                "sees: they must not be scored (labels -100 there; tokenize_chat labels the assistant tokens only)."
            )

    def drop_prompt_positions(self, logits: torch.Tensor) -> torch.Tensor:
        """Teacher outputs ``[batch, teacher_seq, ...]`` (logits or hidden states) realigned to the student's
        positions ``[batch, student_seq, ...]`` (causal LM).

        Student position ``a + d - 1 + k`` (predicting the k-th token after the block) is teacher position
        ``a + p - 1 + k``; positions before the block are the same in both; the ``d`` positions inside the
        student's replaced block have no teacher counterpart and get the teacher's (unscored) last prompt
        positions as placeholders.
        """
        a, d, p = self.insert_at, int(self.replaced.numel()), int(self.ids.numel())
        if a + d == 0:  # the prompt precedes everything: the student's first position is the teacher's p-th
            return logits[:, p:]
        head = logits[:, : max(a - 1, 0)]
        filler = logits[:, a + p - 1 - (a + d - 1 - head.shape[1]) : a + p - 1]
        return torch.cat([head, filler, logits[:, a + p - 1 :]], dim=1)


__all__ = ["PLACEMENTS", "TeacherPrompt"]
