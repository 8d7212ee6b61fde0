"""hf_distill: distil a large Hugging Face model into a small, fast student and ship it to the edge."""

from hf_distill.bench import benchmark
from hf_distill.cache import cache_teacher_logits
from hf_distill.config import DistillationConfig
from hf_distill.losses import KD_LOSSES, distillation_loss, register_kd_loss
from hf_distill.metrics import classification_metrics
from hf_distill.onnx_export import export_onnx
from hf_distill.prompts import make_peft_student, prompt_refine_config
from hf_distill.student import create_student
from hf_distill.tasks import Task, infer_task
from hf_distill.trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "KD_LOSSES",
    "benchmark",
    "export_onnx",
    "make_peft_student",
    "prompt_refine_config",
    "DistillationConfig",
    "DistillationTrainer",
    "Task",
    "cache_teacher_logits",
    "classification_metrics",
    "create_student",
    "distillation_loss",
    "infer_task",
    "register_kd_loss",
]
