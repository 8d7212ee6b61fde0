"""Sequence-level KD data (Kim & Rush 2016): the teacher answers every prompt, the student then trains on its answers.

Generation is transformers' ``generate`` on left-padded batches of chat-templated prompts (greedy or sampled), with a
progress bar and ETA; the result is a ``datasets.Dataset`` with ``prompt`` and ``response`` columns, the format
:func:`hf_distill.chat.tokenize_chat` reads, optionally written with ``save_to_disk``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from hf_distill.atomic import atomic_folder
from hf_distill.chat import conversation


def _prompt_messages(row: dict[str, Any], prompt_column: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation up to (without) the final assistant turn."""
    messages = conversation(
        {**row, "response": row.get("response", "")} if "messages" not in row else row,
        prompt_column=prompt_column,
        response_column="response",
        system_prompt=system_prompt,
    )
    return messages[:-1] if messages[-1].get("role") == "assistant" else messages


@torch.no_grad()
def generate_responses(
    teacher: Any,
    tokenizer: Any,
    prompts: datasets.Dataset,
    *,
    prompt_column: str = "prompt",
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    save_path: str | os.PathLike | None = None,
    desc: str = "Teacher generating",
) -> datasets.Dataset:
    """The teacher's responses to ``prompts`` (rows with ``prompt_column`` or ``messages``), as a Dataset.

    Returns columns ``prompt`` (the row's last user turn), ``response`` (the teacher's decoded answer, special
    tokens removed) and ``messages`` (the whole conversation, the teacher's answer as its last turn).
    ``do_sample=False`` is greedy decoding; sampling uses ``temperature``, ``top_p`` and ``top_k`` (0: off),
    seeded with ``torch.manual_seed(seed)``. ``desc`` labels the progress bar.

    Raises:
        ValueError: an empty dataset, missing prompt column, non-positive sizes, a tokenizer without a chat template,
            or ``save_path`` that already exists.
    """
    if len(prompts) == 0:
        raise ValueError("No prompts to answer: the dataset is empty.")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}.")
    if do_sample and temperature <= 0:
        raise ValueError(f"Sampling needs temperature > 0, got {temperature}; use do_sample=False for greedy.")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; the teacher's prompts are rendered through it.")
    if save_path is not None and Path(save_path).exists():
        raise ValueError(f"{str(save_path)!r} exists; choose a new folder (nothing was generated).")
    conversations = [_prompt_messages(prompts[i], prompt_column, system_prompt) for i in range(len(prompts))]
    # Decoder-only generation needs left padding so that every row's last prompt token sits at the same position.
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher.eval()
    torch.manual_seed(seed)
    device = next(teacher.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    responses: list[str] = []
    with tqdm(total=len(conversations), desc=desc, unit="prompt") as bar:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}  # decoders take no segment ids
            output = teacher.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **({"do_sample": False} | sampling),
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            responses += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.update(len(chunk))
    result = datasets.Dataset.from_dict(
        {
            "prompt": [c[-1]["content"] for c in conversations],
            "response": responses,
            "messages": [
                [*c, {"role": "assistant", "content": r}] for c, r in zip(conversations, responses, strict=True)
            ],
        }
    )
    if save_path is not None:
        with atomic_folder(save_path) as staging:
            result.save_to_disk(str(staging))
    return result
