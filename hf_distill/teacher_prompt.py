"""Prompt (context) distillation: a hand-written prompt in front of every teacher input, none for the student."""

from __future__ import annotations

from typing import Any

import torch


class TeacherPrompt:
    """Puts a hand-written prompt in front of every teacher input (prompt/context distillation).

    The prompt goes after a leading special token ([CLS] / <bos>) when the tokenizer adds one. For causal LMs the
    teacher's logits at the prompt positions are dropped again, so that teacher position i predicts the same next
    token as student position i.
    """

    def __init__(self, text: str, tokenizer: Any) -> None:
        self.ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        probe = tokenizer("x")["input_ids"]
        self.insert_at = 1 if probe and probe[0] in set(tokenizer.all_special_ids) else 0
        self.length = int(self.ids.numel())

    def prepend(self, inputs: dict[str, Any]) -> dict[str, Any]:
        mask = inputs.get("attention_mask")
        if mask is not None and bool((mask[:, 0] == 0).any()):
            raise ValueError("teacher_prompt needs right-padded batches (the tokenizer's padding_side='right').")
        k, batch = self.insert_at, inputs["input_ids"].shape[0]
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
                else torch.full((batch, self.length), fill, dtype=tensor.dtype, device=tensor.device)
            )
            result[key] = torch.cat([tensor[:, :k], middle, tensor[:, k:]], dim=1)
        return result

    def drop_prompt_positions(self, logits: torch.Tensor) -> torch.Tensor:
        """Teacher logits realigned to the student's positions (causal LM)."""
        k, length = self.insert_at, self.length
        if k == 0:
            return logits[:, length:]
        return torch.cat([logits[:, : k - 1], logits[:, k - 1 + length :]], dim=1)


__all__ = ["TeacherPrompt"]
