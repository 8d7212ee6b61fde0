"""hf_distill: distil a large Hugging Face model into a small, fast student and ship it to the edge.

The public names below are imported lazily (PEP 562): ``python -m hf_distill.edge`` runs on a device that has
onnxruntime, tokenizers and numpy but no torch, and ``import hf_distill`` stays cheap until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "DistillationConfig": "hf_distill.config",
    "DistillationTrainer": "hf_distill.trainer",
    "KD_LOSSES": "hf_distill.losses",
    "distillation_loss": "hf_distill.losses",
    "register_kd_loss": "hf_distill.losses",
    "cache_teacher_logits": "hf_distill.cache",
    "create_student": "hf_distill.student",
    "Task": "hf_distill.tasks",
    "infer_task": "hf_distill.tasks",
    "classification_metrics": "hf_distill.metrics",
    "make_peft_student": "hf_distill.prompts",
    "prompt_refine_config": "hf_distill.prompts",
    "load_model": "hf_distill.loading",
    "export_onnx": "hf_distill.export",
    "benchmark": "hf_distill.export",
    "export_llm": "hf_distill.export",
    "benchmark_llm": "hf_distill.export",
    "GateError": "hf_distill.export",
}

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "GateError",
    "KD_LOSSES",
    "Task",
    "benchmark",
    "benchmark_llm",
    "cache_teacher_logits",
    "classification_metrics",
    "create_student",
    "distillation_loss",
    "export_llm",
    "export_onnx",
    "infer_task",
    "load_model",
    "make_peft_student",
    "prompt_refine_config",
    "register_kd_loss",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from hf_distill.cache import cache_teacher_logits
    from hf_distill.config import DistillationConfig
    from hf_distill.export import GateError, benchmark, benchmark_llm, export_llm, export_onnx
    from hf_distill.loading import load_model
    from hf_distill.losses import KD_LOSSES, distillation_loss, register_kd_loss
    from hf_distill.metrics import classification_metrics
    from hf_distill.prompts import make_peft_student, prompt_refine_config
    from hf_distill.student import create_student
    from hf_distill.tasks import Task, infer_task
    from hf_distill.trainer import DistillationTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
