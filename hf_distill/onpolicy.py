"""On-policy distillation (GKD, Agarwal et al. 2024): some batches' responses are sampled from the student itself.

With probability ``lmbda`` a training batch keeps only its prompts; the student samples a response to each (no
gradient through generation) and the divergence to the teacher is taken on those tokens, so the student learns on
the sequences it actually produces (the train/inference mismatch of off-policy KD). ``seq_kd`` instead lets the
teacher write the responses (sequence-level KD, Kim & Rush 2016) for the batches that stay off-policy. These are the
``lmbda`` / ``seq_kd`` terms of the paper and of TRL's ``GKDTrainer``, so results compare.

The batch format is a causal-LM batch whose ``labels`` are -100 on the prompt: the prompt of a row is every position
before its first label, and its response is what gets replaced.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from hf_distill.tasks import IGNORE_INDEX


def split_prompts(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``[batch, max_prompt]`` and their attention mask from a labelled causal-LM batch.

    Raises:
        ValueError: the batch has no ``labels`` (the prompt/response boundary is unknown) or a row has no prompt.
    """
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError(
            "On-policy distillation (lmbda > 0) and seq_kd need labels that are -100 on the prompt and set on the "
            "response, to know where each prompt ends (hf_distill.chat.tokenize_chat builds them)."
        )
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    labelled = labels != IGNORE_INDEX
    # Index of the first response token per row (rows without any label keep their whole real input as prompt).
    first = torch.where(labelled.any(1), labelled.float().argmax(1), mask.sum(1))
    if bool((first == 0).any()):
        raise ValueError("A row's response starts at position 0: on-policy generation needs a prompt before it.")
    width = int(first.max())
    ids = inputs["input_ids"]
    prompts = torch.zeros((ids.shape[0], width), dtype=ids.dtype, device=ids.device)
    prompt_mask = torch.zeros_like(prompts)
    for row, length in enumerate(first.tolist()):
        real = ids[row, :length][mask[row, :length].bool()]  # the prompt's real tokens (right or left padding)
        prompts[row, width - len(real) :] = real
        prompt_mask[row, width - len(real) :] = 1
    return prompts, prompt_mask


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> dict[str, torch.Tensor]:
    """A new batch: each prompt followed by ``model``'s response; labels on the response up to and with its EOS.

    ``model`` is put in eval mode for generation (no dropout) and back in its previous mode after.
    """
    was_training = model.training
    model.eval()
    try:
        options: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            options.update(temperature=temperature, top_k=top_k, top_p=top_p)
        output = model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            **options,
        )
    finally:
        model.train(was_training)
    response = output[:, prompts.shape[1] :]
    keep = torch.ones_like(response, dtype=torch.bool)
    if eos_token_id is not None:
        # Everything after a row's first EOS is padding that generate() filled in.
        after_eos = (response == eos_token_id).long().cumsum(1) - (response == eos_token_id).long()
        keep = after_eos == 0
    attention_mask = torch.cat([prompt_mask, keep.long()], dim=1)
    labels = torch.cat([torch.full_like(prompts, IGNORE_INDEX), response.masked_fill(~keep, IGNORE_INDEX)], dim=1)
    input_ids = torch.cat([prompts, response.masked_fill(~keep, pad_token_id)], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def policy_batch(
    batch: dict[str, Any],
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    args: Any,
    tokenizer_ids: tuple[int, int | None],
    rng: random.Random,
) -> dict[str, Any]:
    """The batch one GKD step trains on: with probability ``args.lmbda`` the student's own responses, else (with
    ``args.seq_kd``) the teacher's, else the dataset's (unchanged). ``tokenizer_ids`` is ``(pad, eos)``."""
    on_policy = args.lmbda > 0 and rng.random() < args.lmbda
    writer = student if on_policy else teacher if args.seq_kd else None
    if writer is None:
        return batch
    prompts, prompt_mask = split_prompts(batch)
    pad_token_id, eos_token_id = tokenizer_ids
    sampled = sample_responses(
        writer,
        prompts,
        prompt_mask,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_k=args.generation_top_k,
        top_p=args.generation_top_p,
    )
    replaced = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")
    return {**{k: v for k, v in batch.items() if k not in replaced}, **sampled}
