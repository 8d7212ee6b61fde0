"""Offline distillation: run the teacher once, store its top-k logits as dataset columns, train without it.

Per example (sequence classification) or per token (token classification, causal LM) the cache keeps the teacher's
``top_k`` largest logits, their class/vocabulary indices and the probability mass, at the cache temperature, of every
other class. The trainer rebuilds a full teacher distribution from them: the top-k probabilities exactly, the leftover
mass spread evenly over the remaining classes. With ``top_k`` equal to the number of classes the raw logits are stored
and the rebuilt teacher is exact, so the loss equals the online teacher's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

from hf_distill.tasks import Task, infer_task

TOPK_LOGITS = "teacher_topk_logits"
TOPK_INDICES = "teacher_topk_indices"
REST_MASS = "teacher_rest_mass"
CACHE_TEMPERATURE = "teacher_temperature"
CACHE_COLUMNS = (TOPK_LOGITS, TOPK_INDICES, REST_MASS, CACHE_TEMPERATURE)
_PAD_KEYS = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "labels": -100}


def has_cached_logits(column_names: Sequence[str]) -> bool:
    return all(column in column_names for column in CACHE_COLUMNS)


def pad_batch(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad tokenized features (input_ids, attention_mask, token_type_ids, labels) into tensors."""
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key == "labels" and not isinstance(values[0], (list, tuple)):
            batch[key] = torch.tensor(values)
            continue
        if key not in _PAD_KEYS:
            continue
        width = max(len(v) for v in values)
        batch[key] = torch.tensor([list(v) + [_PAD_KEYS[key]] * (width - len(v)) for v in values])
    if "attention_mask" not in batch and "input_ids" in batch:
        lengths = [len(f["input_ids"]) for f in features]
        positions = torch.arange(batch["input_ids"].shape[1])[None]
        batch["attention_mask"] = (positions < torch.tensor(lengths)[:, None]).long()
    return batch


@torch.no_grad()
def cache_teacher_logits(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    *,
    top_k: int | None = 20,
    batch_size: int = 32,
    temperature: float = 1.0,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    save_path: str | None = None,
) -> datasets.Dataset:
    """Run ``teacher`` over a tokenized ``dataset`` once and return it with the teacher's top-k logits as columns.

    ``top_k=None`` keeps every class (exact; right for classification, costly for a large vocabulary). The rest
    mass is computed at ``temperature``, which must then equal the training temperature. ``save_path`` writes the
    result with ``Dataset.save_to_disk`` (Arrow); load it back with ``datasets.load_from_disk``.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"cache_teacher_logits needs a datasets.Dataset, got {type(dataset).__name__}.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The dataset must be tokenized (an 'input_ids' column); it has {dataset.column_names}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    task = infer_task(teacher)
    collate = data_collator or pad_batch
    teacher.eval()
    device = next(teacher.parameters()).device
    logits_rows: list[list] = []
    index_rows: list[list] = []
    rest_rows: list[Any] = []
    model_keys = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    for start in tqdm(range(0, len(dataset), batch_size), desc="Caching teacher logits", unit="batch"):
        features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = {k: v.to(device) for k, v in collate(features).items() if k in model_keys}
        logits = teacher(**inputs).logits.float()
        num_classes = logits.shape[-1]
        k = num_classes if top_k is None else top_k
        if not 1 <= k <= num_classes:
            raise ValueError(f"top_k must be in [1, {num_classes}] (the teacher's classes), got {top_k}.")
        values, indices = logits.topk(k, dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        rest = (1.0 - probs.gather(-1, indices).sum(-1)).clamp_min(0.0)
        if task is Task.SEQUENCE_CLASSIFICATION:
            logits_rows += values.cpu().tolist()
            index_rows += indices.cpu().tolist()
            rest_rows += rest.cpu().tolist()
            continue
        keep = inputs.get("attention_mask", torch.ones(logits.shape[:2], device=device)).bool()
        for row in range(logits.shape[0]):
            logits_rows.append(values[row][keep[row]].cpu().tolist())
            index_rows.append(indices[row][keep[row]].cpu().tolist())
            rest_rows.append(rest[row][keep[row]].cpu().tolist())
    cached = dataset.remove_columns([c for c in CACHE_COLUMNS if c in dataset.column_names])
    cached = (
        cached.add_column(TOPK_LOGITS, logits_rows)
        .add_column(TOPK_INDICES, index_rows)
        .add_column(REST_MASS, rest_rows)
        .add_column(CACHE_TEMPERATURE, [float(temperature)] * len(dataset))
    )
    if save_path is not None:
        cached.save_to_disk(save_path)
    return cached


class CachedLogitsCollator:
    """Wraps a data collator: collates the usual fields with it and pads the cached teacher columns to match.

    Cached rows are placed on the positions where the collated attention mask is 1, so left and right padding both
    line up with the positions the teacher saw.
    """

    def __init__(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.base = base

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features or TOPK_LOGITS not in features[0]:
            return self.base(features)
        cached = [{c: f.pop(c) for c in CACHE_COLUMNS} for f in features]
        batch = dict(self.base(features))
        logits = [torch.as_tensor(c[TOPK_LOGITS], dtype=torch.float32) for c in cached]
        indices = [torch.as_tensor(c[TOPK_INDICES], dtype=torch.long) for c in cached]
        rest = [torch.as_tensor(c[REST_MASS], dtype=torch.float32) for c in cached]
        batch[CACHE_TEMPERATURE] = torch.tensor([c[CACHE_TEMPERATURE] for c in cached])
        if logits[0].dim() == 1:  # one distribution per example
            batch[TOPK_LOGITS], batch[TOPK_INDICES], batch[REST_MASS] = (
                torch.stack(logits),
                torch.stack(indices),
                torch.stack(rest),
            )
            return batch
        mask = batch["attention_mask"].bool()
        k = logits[0].shape[-1]
        padded_logits = torch.zeros(*mask.shape, k)
        padded_indices = torch.arange(k).expand(*mask.shape, k).clone()
        padded_rest = torch.zeros(mask.shape)
        for row in range(len(cached)):
            if int(mask[row].sum()) != logits[row].shape[0]:
                raise ValueError(
                    f"Cached teacher logits cover {logits[row].shape[0]} tokens but the collated example has "
                    f"{int(mask[row].sum())}: the dataset was re-tokenized or truncated after caching. Re-run "
                    "cache_teacher_logits on the final dataset."
                )
            padded_logits[row, mask[row]] = logits[row]
            padded_indices[row, mask[row]] = indices[row]
            padded_rest[row, mask[row]] = rest[row]
        batch[TOPK_LOGITS], batch[TOPK_INDICES], batch[REST_MASS] = padded_logits, padded_indices, padded_rest
        return batch


def dense_teacher_logits(
    topk_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    rest_mass: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """Rebuild full teacher logits ``[..., num_classes]`` from a top-k cache.

    Full cache (k = num_classes): the raw logits, exactly. Partial cache: logits ``T·log p`` whose softmax at
    temperature T gives the top-k probabilities scaled to ``1 − rest_mass`` and the rest mass spread evenly.
    """
    k = topk_logits.shape[-1]
    if k == num_classes:
        return torch.zeros(*topk_logits.shape[:-1], num_classes, device=topk_logits.device).scatter(
            -1, topk_indices, topk_logits.float()
        )
    tiny = torch.finfo(torch.float32).tiny
    top_probs = torch.softmax(topk_logits.float() / temperature, -1) * (1.0 - rest_mass).unsqueeze(-1)
    other = (rest_mass / (num_classes - k)).clamp_min(tiny).unsqueeze(-1)
    probs = other.expand(*topk_logits.shape[:-1], num_classes).clone().scatter(-1, topk_indices, top_probs)
    return temperature * torch.log(probs.clamp_min(tiny))
