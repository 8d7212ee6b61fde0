"""Task metrics that work offline.

`evaluate.load("accuracy")` downloads the metric script from the Hub, which fails without a network. Accuracy and
macro-F1 are a few lines of numpy, so we compute them here instead of shipping a copy of the metric script.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import EvalPrediction


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float((predictions == references).mean()) if len(references) else 0.0


def macro_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    scores = []
    for label in np.unique(references):
        tp = np.sum((predictions == label) & (references == label))
        fp = np.sum((predictions == label) & (references != label))
        fn = np.sum((predictions != label) & (references == label))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def classification_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for sequence and token classification: accuracy and macro-F1 over labelled positions."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = np.asarray(eval_pred.label_ids)
    predictions = np.asarray(logits).argmax(-1)
    keep = labels != -100
    predictions, labels = predictions[keep], labels[keep]
    return {"accuracy": accuracy(predictions, labels), "f1": macro_f1(predictions, labels)}


def evaluate_accuracy(model: Any, dataset: Any, tokenizer: Any, batch_size: int = 64) -> float:
    """Accuracy in % of a sequence classifier on a tokenized dataset with ``labels``, the model as it is.

    A plain inference loop (no Trainer: no output folder, no logging), padding each batch with the tokenizer. The
    model gets its inputs as in training (:func:`hf_distill.forward.run_model`: only those it takes, positions and
    the scored position from the attention mask, whichever side the tokenizer pads).
    """
    import torch
    from transformers import DataCollatorWithPadding

    from hf_distill.forward import run_model

    collate = DataCollatorWithPadding(tokenizer)
    columns = ["input_ids", "attention_mask", "token_type_ids", "labels"]
    rows = dataset.remove_columns([c for c in dataset.column_names if c not in columns])
    correct = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            labels = batch.pop("labels")
            correct += int((run_model(model, batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / max(len(rows), 1)
