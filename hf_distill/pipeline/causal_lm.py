"""`hf-distill run` for chat LMs (``task: causal-lm``): the defaults that differ from a classifier run, and what such a
run cannot do yet. The checks run with the rest of the config's, before any stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_distill.export.genai import GENAI_VARIANTS

if TYPE_CHECKING:
    from hf_distill.pipeline.config import PipelineConfig

TASKS = ("sequence-classification", "causal-lm")
# What a causal-lm run changes from the classifier defaults above (keys the user gives win): a chat LM is not
# fine-tuned first, is exported to int4 with a KV cache behind a perplexity gate (percent), and is timed by
# time to first token at two prompt lengths.
CAUSAL_LM_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"train": "instruct/train.jsonl", "validation": "instruct/eval.jsonl", "max_length": 256},
    "teacher": {"model": "smollm2", "finetune": False},
    "student": {"num_layers": 10, "calibration_size": 32},
    "export": {"variants": ["int4"], "max_metric_drop": 5.0, "num_validation": 16},
    "bench": {"seq_lens": [128, 512], "batch_sizes": [1], "runs": 3},
}


def with_task_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the task's defaults under the keys the user gave (causal-lm: :data:`CAUSAL_LM_DEFAULTS`)."""
    task = raw.get("task", "sequence-classification")
    if task not in TASKS:
        raise ValueError(
            f"hf-distill run handles the tasks {list(TASKS)}, got task {task!r}; the library "
            "(DistillationTrainer) handles token classification from Python (recipes/token_classification.py)."
        )
    if task == "causal-lm":
        for name, defaults in CAUSAL_LM_DEFAULTS.items():
            given = raw.get(name) or {}
            raw[name] = {**defaults, **given} if isinstance(given, dict) else given
    return raw


def data_file_exists(value: str, task: str) -> bool:
    """A path as given, or (causal-lm, whose defaults are relative to the data folders) under the data roots."""
    if Path(value).expanduser().exists():
        return True
    if task != "causal-lm":
        return False
    from hf_distill.data import find_data_file

    try:
        find_data_file(value)
    except ValueError:
        return False
    return True


def check_causal_lm(config: PipelineConfig) -> None:
    """What a causal-lm run cannot do (yet), each with the way out."""
    problems = {
        "teacher.finetune": (config.teacher.finetune, "a chat teacher is distilled as it is: set it to false"),
        "refine.enabled": (config.refine.enabled, "refine a chat student with recipes/prompt_refine.py"),
        "push.enabled": (
            config.push.enabled,
            "not yet; upload OUTPUT/distill/student/model and OUTPUT/export/onnx with `huggingface-cli upload`",
        ),
        "data.unlabelled": (config.data.unlabelled is not None, "add the text as prompt/response rows"),
    }
    for key, (bad, fix) in problems.items():
        if bad:
            raise ValueError(f"Config key {key!r} is not supported for task 'causal-lm': {fix}.")
    wrong = [v for v in config.export.variants if v not in GENAI_VARIANTS]
    if config.export.enabled and wrong:
        raise ValueError(
            f"Config key 'export.variants' for task 'causal-lm' takes {list(GENAI_VARIANTS)} (onnxruntime-genai, "
            f"KV cache), got {wrong}."
        )
    if config.export.enabled and config.export.engine == "torch":
        raise ValueError("export.engine 'torch' has no KV cache; task 'causal-lm' exports with 'auto' or 'genai'.")
