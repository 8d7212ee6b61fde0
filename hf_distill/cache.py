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
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
from tqdm.auto import tqdm

from hf_distill.forward import input_position_logits, run_model
from hf_distill.tasks import Task, infer_task
from hf_distill.teacher_logits import TeacherLogits, dense_teacher_logits, topk_summary  # noqa: F401 (re-exported)

TOPK_LOGITS = "teacher_topk_logits"
TOPK_INDICES = "teacher_topk_indices"
REST_MASS = "teacher_rest_mass"
CACHE_TEMPERATURE = "teacher_temperature"
# The teacher's number of classes (vocabulary size for causal LM), one int per row: caches written before it existed
# lack it and stay loadable (their indices are checked instead).
CACHE_NUM_CLASSES = "teacher_num_classes"
REQUIRED_CACHE_COLUMNS = (TOPK_LOGITS, TOPK_INDICES, REST_MASS, CACHE_TEMPERATURE)
CACHE_COLUMNS = (*REQUIRED_CACHE_COLUMNS, CACHE_NUM_CLASSES)
_PAD_KEYS = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "position_ids": 0, "labels": -100}


def dataset_columns(dataset: Any) -> list[str] | None:
    """Column names of a datasets.Dataset, or the keys of a map-style dataset's first example."""
    if dataset is None:
        return None
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    try:
        first = dataset[0]
    except Exception:  # iterable or empty datasets: nothing to check up front
        return None
    return list(first) if isinstance(first, dict) else None


def has_cached_logits(column_names: Sequence[str]) -> bool:
    """True when every column a cache needs is there (the class count is optional: older caches lack it)."""
    return all(column in column_names for column in REQUIRED_CACHE_COLUMNS)


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


def _flat_column(dataset: Any, column: str) -> Any:
    """All values of ``column`` over every row, flattened: a pyarrow array for datasets, else a list."""
    if isinstance(dataset, datasets.Dataset):
        values = dataset.with_format("arrow")[column]  # memory-mapped, no Python objects per value
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = pc.list_flatten(values)
        return values
    flat: list[float] = []
    for i in range(len(dataset)):
        stack = [dataset[i][column]]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)) or torch.is_tensor(item):
                stack.extend(list(item))
            else:
                flat.append(float(item))
    return flat


def column_max(dataset: Any, column: str) -> float:
    """Largest value of a (nested) numeric column over the whole dataset; -inf for an empty one."""
    values = _flat_column(dataset, column)
    if isinstance(values, list):
        return max(values, default=float("-inf"))
    largest = pc.max(values).as_py()
    return float("-inf") if largest is None else float(largest)


def column_values(dataset: Any, column: str) -> set[float]:
    """The distinct values of a per-row scalar column (temperature, class count) over the whole dataset."""
    values = _flat_column(dataset, column)
    return set(values) if isinstance(values, list) else {float(v) for v in pc.unique(values).to_pylist()}


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
    mass is computed at ``temperature``, which must then equal the training temperature. The teacher's number of
    classes goes in the column ``teacher_num_classes``, so that training can refuse a student with another label
    set or vocabulary. ``save_path`` writes the result with ``Dataset.save_to_disk`` (Arrow); load it back with
    ``datasets.load_from_disk``.

    The teacher sees what it would see online: only the collated inputs it accepts, position ids from the attention
    mask for decoder-only models (left padding gives the logits of right padding) and, for decoder classifiers, the
    score of the last attended position.
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
    num_classes = 0
    for start in tqdm(range(0, len(dataset), batch_size), desc="Caching teacher logits", unit="batch"):
        features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = {k: v.to(device) for k, v in collate(features).items() if torch.is_tensor(v)}
        # The same inputs, positions and pooling as the online teacher in DistillationTrainer.
        logits = input_position_logits(teacher, run_model(teacher, inputs).logits)
        num_classes = logits.shape[-1]
        values, indices, rest = topk_summary(logits, num_classes if top_k is None else top_k, temperature)
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
        .add_column(CACHE_NUM_CLASSES, [int(num_classes)] * len(dataset))
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
        columns = [c for c in CACHE_COLUMNS if c in features[0]]
        cached = [{c: f.pop(c) for c in columns} for f in features]
        batch = dict(self.base(features))
        logits = [torch.as_tensor(c[TOPK_LOGITS], dtype=torch.float32) for c in cached]
        indices = [torch.as_tensor(c[TOPK_INDICES], dtype=torch.long) for c in cached]
        rest = [torch.as_tensor(c[REST_MASS], dtype=torch.float32) for c in cached]
        batch[CACHE_TEMPERATURE] = torch.tensor([float(c[CACHE_TEMPERATURE]) for c in cached])
        if CACHE_NUM_CLASSES in columns:
            batch[CACHE_NUM_CLASSES] = torch.tensor([int(c[CACHE_NUM_CLASSES]) for c in cached])
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


def teacher_logits_from_cache(
    cached: dict[str, torch.Tensor], teacher_classes: int, temperature: float
) -> TeacherLogits:
    """The teacher's logits for one collated batch of cached columns, checked first, as a :class:`TeacherLogits`.

    ``teacher_classes`` is the teacher's number of classes validated before training (the cache's
    ``teacher_num_classes``; the student's output size for older caches without it) and ``temperature`` the training
    temperature. Rows of a partial cache (top-k < classes) with leftover mass must have been built at the training
    temperature (their rest mass holds only there); the rebuilt logits (:func:`dense_teacher_logits`, a chunk of
    positions at a time) then hold the teacher's distribution at ``temperature``.

    Raises:
        ValueError: the batch has no cached columns (an eval or test set that was never cached), the cache comes
            from a teacher with another number of classes, or its rows were built at another temperature.
    """
    missing = [c for c in REQUIRED_CACHE_COLUMNS if c not in cached]
    if missing:
        raise ValueError(
            f"teacher=None, but this batch has no cached teacher logits (missing {missing}): every dataset the "
            "trainer evaluates or predicts with labels needs them. Run cache_teacher_logits(teacher, dataset) on it "
            "too, or pass teacher=."
        )
    indices, rest = cached[TOPK_INDICES], cached[REST_MASS]
    cached_classes = cached.get(CACHE_NUM_CLASSES)
    if (cached_classes is not None and bool((cached_classes != teacher_classes).any())) or (
        indices.numel() and int(indices.max()) >= teacher_classes
    ):
        found = sorted({int(c) for c in cached_classes.flatten()}) if cached_classes is not None else "more"
        raise ValueError(
            f"The cached teacher logits come from a teacher with {found} classes but {teacher_classes} were checked "
            "before training (the student's, or the train cache's teacher): "
            "the cache comes from a teacher with another label set or vocabulary. Rebuild it with the teacher "
            "of this student."
        )
    partial = cached[TOPK_LOGITS].shape[-1] < teacher_classes
    temperatures = cached[CACHE_TEMPERATURE].float()
    if partial and bool((rest > 0).any()) and bool(((temperatures - temperature).abs() > 1e-6).any()):
        raise ValueError(
            f"This batch holds cached teacher logits built at temperature(s) {sorted(set(temperatures.tolist()))} "
            f"with top-k < {teacher_classes} classes, but training uses temperature={temperature}: the leftover mass "
            "only holds at the cache's temperature. Rebuild the cache with cache_teacher_logits(..., temperature="
            f"{temperature})."
        )
    return TeacherLogits.top_k(cached[TOPK_LOGITS], indices, rest, teacher_classes, temperature)
