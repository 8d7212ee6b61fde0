"""The accuracy gate: each ONNX variant against PyTorch on real batches (max |Δlogits|, the task metric, the drop).

Metrics (higher is better unless said): ``accuracy`` in % (classification; a row with non-finite logits counts as
wrong), ``r2`` in points, 100·R² = 100·(1 − MSE / Var(labels)) (regression heads; ``mse`` is reported too),
``perplexity`` (causal LM, lower is better). The drop is points lost (accuracy, r2) or percent gained (perplexity).
A variant fails when its drop exceeds ``max_metric_drop`` or when any output it gives on the validation rows is
NaN/inf; every failing row carries a ``reason``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_distill.export.batches import EvalBatches
from hf_distill.export.inputs import reads_last_position
from hf_distill.tasks import IGNORE_INDEX, Task


def variant_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The variant results as a Markdown table: one row per variant, with the gate's verdict and reason.

    ``rows`` are the report's ``variants`` rows (missing fields are left blank, so a subset of the keys works).
    """
    lines = [f"| variant | {metric} | drop | max abs diff | MB | gate |", "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "pass" if r.get("passed") else "FAIL" + (f": {r['reason']}" if r.get("reason") else "")
        size = r.get("size_bytes")
        lines.append(
            f"| {r.get('variant', '')} | {_num(r.get('metric_value'), '.2f')} | {_num(r.get('metric_drop'), '.2f')} "
            f"| {_num(r.get('max_abs_diff'), '.3g')} | {_num(None if size is None else size / 1e6, '.1f')} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


class GateError(ValueError):
    """An exported variant lost more of the task metric than ``max_metric_drop`` allows, or gave NaN/inf."""

    def __init__(self, failed: list[str], report: dict[str, Any]) -> None:
        self.failed, self.report = failed, report
        reference = report["reference"]
        super().__init__(
            f"Variants {failed} failed the accuracy gate: they lost more than max_metric_drop="
            f"{report['max_metric_drop']} or gave NaN/inf (reference {reference['metric']}={reference['value']:.4f}):\n"
            + variant_table(report["variants"], reference["metric"])
            + "\nNothing was written. Drop those variants, raise max_metric_drop, or pass fail_on_gate=False "
            "(--allow-failed) to keep them marked as failed."
        )


@dataclass
class Reference:
    logits: list[np.ndarray]
    metric: str
    value: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"engine": "pytorch", "metric": self.metric, "value": self.value, **self.extra}


def task_metric(
    task: Task, logits: list[np.ndarray], labels: list[np.ndarray], regression: bool = False
) -> tuple[str, float | None, dict[str, float]]:
    """``(name, value, extra)`` over the labelled positions; see the module docstring. ``value`` is None when no
    output is finite."""
    if task is Task.CAUSAL_LM:
        nll, count = 0.0, 0
        for batch_logits, batch_labels in zip(logits, labels, strict=True):
            shifted = torch.from_numpy(batch_logits[:, :-1]).float()
            targets = torch.from_numpy(batch_labels[:, 1:])
            keep = (targets != IGNORE_INDEX) & torch.isfinite(shifted).all(-1)
            nll += float(torch.nn.functional.cross_entropy(shifted[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
        return "perplexity", (math.exp(nll / count) if count else None), {}
    if regression:
        predictions = np.concatenate([b.reshape(len(b), -1)[:, 0] for b in logits]).astype(np.float64)
        targets = np.concatenate(labels).astype(np.float64)
        keep = np.isfinite(predictions)
        if not keep.any():
            return "r2", None, {}
        mse = float(np.mean((predictions[keep] - targets[keep]) ** 2))
        return "r2", 100.0 * (1.0 - mse / float(np.var(targets))), {"mse": mse}
    correct = total = 0
    for batch_logits, batch_labels in zip(logits, labels, strict=True):
        keep = batch_labels != IGNORE_INDEX
        predictions = np.where(np.isfinite(batch_logits).all(-1), batch_logits.argmax(-1), -1)  # NaN is never right
        correct += int((predictions[keep] == batch_labels[keep]).sum())
        total += int(keep.sum())
    return "accuracy", 100.0 * correct / max(total, 1), {}


def metric_drop(metric: str, reference: float, value: float | None) -> float | None:
    """Points of accuracy / R² lost, or percent of perplexity gained; None when the variant has no value."""
    if value is None:
        return None
    return 100.0 * (value / reference - 1.0) if metric == "perplexity" else reference - value


def non_finite_rows(outputs: list[np.ndarray], batches: EvalBatches) -> int:
    """Rows with a NaN/inf output at an attended position (a padded position's output carries no meaning)."""
    count = 0
    for out, feed in zip(outputs, batches.inputs, strict=True):
        bad = ~np.isfinite(out)
        if bad.ndim == 3:
            bad = bad.any(-1) & (feed["attention_mask"] == 1)
        count += int(bad.reshape(len(bad), -1).any(-1).sum())
    return count


def _forward(model: Any, feed: dict[str, np.ndarray], task: Task, virtual_tokens: int) -> np.ndarray:
    kwargs = {k: torch.from_numpy(v) for k, v in feed.items() if k != "prompt_embeds"}
    if task is Task.CAUSAL_LM:
        kwargs["use_cache"] = False
    out = model(**kwargs).logits.float()
    return (out[:, virtual_tokens:] if out.dim() == 3 else out).numpy()


@torch.no_grad()
def torch_logits(model: Any, feed: dict[str, np.ndarray], task: Task, virtual_tokens: int = 0) -> np.ndarray:
    """PyTorch logits of one right-padded numpy batch (float32), without a prompt model's virtual positions.

    A decoder classifier (:func:`~hf_distill.export.inputs.reads_last_position`) runs each row alone when the
    batch is padded: that is its true output, whatever transformers makes of padding behind a soft prompt.
    """
    mask = feed["attention_mask"]
    if mask.all() or not reads_last_position(model):
        return _forward(model, feed, task, virtual_tokens)
    tokens = {k: v for k, v in feed.items() if k != "prompt_embeds"}
    rows = [{k: v[i : i + 1, : int(mask[i].sum())] for k, v in tokens.items()} for i in range(len(mask))]
    return np.concatenate([_forward(model, row, task, virtual_tokens) for row in rows])


@torch.no_grad()
def evaluate_torch(model: Any, batches: EvalBatches, task: Task, virtual_tokens: int = 0) -> Reference:
    """PyTorch logits (:func:`torch_logits`) and metric of the trained model on every validation batch.

    Raises:
        ValueError: the PyTorch model itself gives NaN/inf logits (no export could be validated against it).
    """
    logits = [torch_logits(model, feed, task, virtual_tokens) for feed in batches.inputs]
    bad = non_finite_rows(logits, batches)
    if bad:
        raise ValueError(
            f"The PyTorch model itself gives non-finite logits on {bad} of {batches.num_examples} rows of the "
            "validation data (NaN/inf weights or an overflow); fix the model before exporting it."
        )
    metric, value, extra = task_metric(task, logits, batches.labels, batches.regression)
    return Reference(logits, metric, float(value), extra)


def run_onnx(path: str | Path, batches: EvalBatches, providers: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [
        session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0].astype(np.float32)
        for feed in batches.inputs
    ]


def _max_abs_diff(outputs: list[np.ndarray], reference: Reference, batches: EvalBatches) -> float | None:
    """Largest |ONNX − PyTorch| over attended positions where both are finite (None when none is)."""
    largest = None
    for out, ref, feed in zip(outputs, reference.logits, batches.inputs, strict=True):
        delta = np.abs(out - ref)
        if delta.ndim == 3:  # padded positions carry no meaning
            delta = delta[feed["attention_mask"] == 1]
        delta = delta[np.isfinite(delta)]
        if delta.size:
            largest = max(largest or 0.0, float(delta.max()))
    return largest


def gate_reason(metric: str, drop: float | None, max_metric_drop: float, non_finite: int, rows: int) -> str | None:
    """Why a variant fails the gate, or None when it passes."""
    reasons = [f"non-finite outputs (NaN/inf) in {non_finite} of {rows} rows"] if non_finite else []
    if drop is None:
        reasons.append(f"no finite {metric}")
    elif drop > max_metric_drop:
        reasons.append(f"{metric} drop {drop:.2f} > max_metric_drop {max_metric_drop:.2f}")
    return "; ".join(reasons) or None


def validate_variant(
    built: Any, folder: Path, batches: EvalBatches, reference: Reference, task: Task, max_metric_drop: float
) -> dict[str, Any]:
    """Run one built variant on the validation batches and judge it; the row goes into the export report."""
    path = folder / built.file
    outputs = run_onnx(path, batches)
    bad = non_finite_rows(outputs, batches)
    metric, value, extra = task_metric(task, outputs, batches.labels, batches.regression)
    drop = metric_drop(metric, reference.value, value)
    reason = gate_reason(metric, drop, max_metric_drop, bad, batches.num_examples)
    size = os.path.getsize(path) + sum(os.path.getsize(p) for p in folder.glob(built.file + ".data"))
    return {
        "variant": built.variant,
        "file": built.file,
        "size_bytes": size,
        "max_abs_diff": _max_abs_diff(outputs, reference, batches),
        "non_finite_rows": bad,
        "metric": metric,
        "metric_value": value,
        **extra,
        "reference_metric_value": reference.value,
        "metric_drop": drop,
        "passed": reason is None,
        "reason": reason,
        "settings": built.settings,
    }
