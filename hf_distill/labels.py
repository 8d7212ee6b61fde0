"""Class labels of a classification job: taken from the data (or given names), checked before anything trains.

One rule for every place that needs the label set (teacher fine-tuning, the pipeline, the report):

- integer labels keep their ids (``0, 1, 2``); names come from ``label_names`` (index = id), else ``LABEL_<id>``;
- string labels (``sports``, ``politics``, ...) get ids in sorted order, or in the order of ``label_names``;
- every validation label must occur in the training data (the model could never learn it otherwise);
- a model that already has a task head must agree with that label set (:func:`agree_with_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LabelSet:
    """``id2label`` (class id -> name) and ``value_ids`` (a value of the data's label column -> class id)."""

    id2label: dict[int, str]
    value_ids: dict[Any, int]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    @property
    def names(self) -> list[str]:
        """Names in id order."""
        return [self.id2label[i] for i in sorted(self.id2label)]

    def encode(self, values: Sequence[Any]) -> list[int]:
        """Class ids of label-column values.

        Raises:
            ValueError: a value outside the label set.
        """
        unknown = sorted({repr(v) for v in values if v not in self.value_ids or isinstance(v, bool)})
        if unknown:
            raise ValueError(f"Label(s) {unknown} are not in the label set {self.names} (ids {self.value_ids}).")
        return [self.value_ids[v] for v in values]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_values(values: Sequence[Any], where: str) -> None:
    """All integers >= 0 or all strings: anything else (missing cells, floats, -1 'unlabelled') has no class."""
    bad = [v for v in values if not (_is_int(v) and v >= 0) and not (isinstance(v, str) and v)]
    if bad or not values:
        shown = sorted({repr(v) for v in bad})[:5]
        raise ValueError(
            f"The labels of {where} must be class ids (integers >= 0) or class names (strings)"
            + (f"; found {shown}." if bad else "; it has no rows.")
        )
    if any(_is_int(v) for v in values) and any(isinstance(v, str) for v in values):
        raise ValueError(f"The labels of {where} mix integers and strings; use one kind in a label column.")


def _check_names(label_names: Sequence[Any]) -> list[str]:
    names = list(label_names)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"data.label_names must be a list of distinct, non-empty strings (id = index), got {names}.")
    return names


def labels_from_data(
    train: Sequence[Any],
    validation: Sequence[Any],
    label_names: Sequence[str] | None = None,
    where: tuple[str, str] = ("the training data", "the validation data"),
) -> LabelSet:
    """The label set of a job from its label columns (see the module docstring for the rule).

    Args:
        train, validation: the label-column values of each split.
        label_names: class names in id order (``data.label_names``); None: from the data.
        where: how to name the two splits in errors (e.g. their file paths).

    Raises:
        ValueError: labels that are neither class ids nor names, integer ids without a name in ``label_names``,
            string labels missing from ``label_names``, or a validation label the training data lacks.
    """
    train, validation = list(train), list(validation)
    _check_values(train, where[0])
    _check_values(validation, where[1])
    names = _check_names(label_names) if label_names is not None else None
    seen, kind = set(train), _is_int(train[0])
    unseen = sorted(set(validation) - seen, key=repr)
    if unseen:
        raise ValueError(
            f"{where[1]} has label(s) {unseen} that {where[0]} lacks (training labels: {sorted(seen, key=repr)}): "
            "the model cannot learn them. Fix the files, or use a larger training sample (data.train_size)."
        )
    if kind:
        count = len(names) if names is not None else max(seen) + 1
        if max(seen) >= count:
            raise ValueError(
                f"Label id {max(seen)} has no name: data.label_names lists {count} names for ids 0..{count - 1}."
            )
        id2label = {i: names[i] if names is not None else f"LABEL_{i}" for i in range(count)}
        return LabelSet(id2label, {i: i for i in range(count)})
    order = names if names is not None else sorted(seen)
    missing = sorted(seen - set(order))
    if missing:
        raise ValueError(f"Label(s) {missing} of {where[0]} are not in data.label_names {order}.")
    return LabelSet(dict(enumerate(order)), {name: i for i, name in enumerate(order)})


def _generic(id2label: Mapping[int, str]) -> bool:
    """transformers' placeholder names (``LABEL_0``, ...): the model's config says nothing about its classes."""
    return all(name == f"LABEL_{i}" for i, name in id2label.items())


def agree_with_model(
    labels: LabelSet, model_id2label: Mapping[Any, str], model: str, names_given: bool = False
) -> LabelSet:
    """The label set to train with when ``model`` already has a task head: the data's, checked against the model's.

    The class count must be the same. A model with real class names keeps its ids: string labels are matched to
    them by name, and integer labels take its names (``label_names``, when given, must equal them). A model with
    placeholder names (``LABEL_<id>``) accepts integer labels, and string labels only with ``names_given`` (the
    user's ``data.label_names`` states the model's class order).

    Raises:
        ValueError: the model's classes do not agree with the data's.
    """
    model_labels = {int(i): str(name) for i, name in model_id2label.items()}
    fix = "fine-tune it on this data instead (teacher.finetune: true)"
    if len(model_labels) != labels.num_labels:
        raise ValueError(
            f"The model {model} has {len(model_labels)} classes {list(model_labels.values())}, the data "
            f"{labels.num_labels} ({labels.names}). Use a model trained on these classes, set data.label_names "
            f"to its classes, or {fix}."
        )
    string_valued = any(isinstance(v, str) for v in labels.value_ids)
    if _generic(model_labels):
        if string_valued and not names_given:
            raise ValueError(
                f"The model {model} has no class names (id2label {model_labels}), so the data's labels "
                f"{labels.names} cannot be matched to its class ids. Set data.label_names to its classes in id "
                f"order, or {fix}."
            )
        return labels
    if string_valued:
        if set(model_labels.values()) != set(labels.names):
            raise ValueError(f"The model {model} has classes {model_labels}, the data {labels.names}: {fix}.")
        by_name = {name: i for i, name in model_labels.items()}
        return LabelSet(model_labels, {value: by_name[labels.id2label[i]] for value, i in labels.value_ids.items()})
    if names_given and [model_labels[i] for i in sorted(model_labels)] != labels.names:
        raise ValueError(
            f"data.label_names {labels.names} disagree with the model {model}'s classes {model_labels}; "
            "drop data.label_names or list its classes in id order."
        )
    return LabelSet(model_labels, labels.value_ids)
