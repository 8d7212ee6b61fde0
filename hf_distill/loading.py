"""The one rule for turning a folder (a saved model or a PEFT adapter) or a Hub id into a model and its tokenizer.

Everything that loads a model from disk goes through :func:`load_model`: the teacher of ``DistillationTrainer``,
the pipeline's stages, ``export_onnx`` and the benchmark. Weights load as safetensors only (never pickle), and no
remote code runs unless the caller passes ``trust_remote_code=True`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from hf_distill.tasks import AUTO_CLASSES, Task, task_from_architecture

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_TASK_TYPES = {
    "SEQ_CLS": Task.SEQUENCE_CLASSIFICATION,
    "TOKEN_CLS": Task.TOKEN_CLASSIFICATION,
    "CAUSAL_LM": Task.CAUSAL_LM,
}


def is_adapter_folder(source: str | os.PathLike) -> bool:
    return (Path(source) / ADAPTER_CONFIG).is_file()


def load_model(
    source: str | os.PathLike,
    task: Task | str | None = None,
    *,
    with_tokenizer: bool = True,
    purpose: str = "load",
    **model_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)`` from a ``save_pretrained`` folder, a PEFT adapter folder, or a Hub id.

    The Auto class comes from ``task`` when given, else from the saved ``config.json``'s architecture (or the
    adapter's ``task_type``); ``purpose`` names what the caller does, for error messages. ``model_kwargs`` go
    to ``from_pretrained`` (``dtype``, ``trust_remote_code``, ...).

    Raises:
        ValueError: ``source`` is a file, a folder without ``config.json``/``adapter_config.json``, or an
            architecture that is not sequence classification, token classification or causal LM.
    """
    path = Path(source).expanduser()
    if path.is_file():
        raise ValueError(f"Model path {str(source)!r} is a file; pass the folder written by save_pretrained.")
    model_kwargs.setdefault("use_safetensors", True)
    if path.is_dir() and is_adapter_folder(path):
        model = _load_adapter(path, task, model_kwargs)
    else:
        local = path.exists() or _looks_like_path(str(source))
        if local and not (path / "config.json").is_file():
            raise ValueError(
                f"No saved model in {str(source)!r} (config.json missing). Pass the folder written by "
                "trainer.save_model() / save_pretrained(), or the model object itself."
            )
        task = Task(task) if task is not None else _task_of_saved(str(source), purpose)
        model = AUTO_CLASSES[task].from_pretrained(str(source), **model_kwargs)
    return model, (load_tokenizer(path if path.is_dir() else str(source)) if with_tokenizer else None)


def _looks_like_path(source: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything absolute, relative (./, ../, ~) or deeper is a local path."""
    return source.startswith((".", "/", "~")) or os.path.isabs(source) or source.count("/") > 1 or "\\" in source


def load_tokenizer(source: str | os.PathLike) -> Any:
    """The tokenizer saved with a model, or None when the folder holds none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError):
        return None


def _task_of_saved(source: str, purpose: str) -> Task:
    from transformers import AutoConfig

    architecture = (AutoConfig.from_pretrained(source).architectures or ["?"])[0]
    return task_from_architecture(architecture, purpose)


def _load_adapter(folder: Path, task: Task | str | None, model_kwargs: dict[str, Any]) -> nn.Module:
    from peft import (
        AutoPeftModelForCausalLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
        PeftConfig,
    )

    task_type = str(PeftConfig.from_pretrained(str(folder)).task_type)
    if task_type not in _PEFT_TASK_TYPES:
        raise ValueError(f"Cannot load a PEFT adapter of task type {task_type}; supported: {sorted(_PEFT_TASK_TYPES)}.")
    if task is not None and Task(task) is not _PEFT_TASK_TYPES[task_type]:
        raise ValueError(f"The adapter in {folder} is for {task_type}, not {Task(task).value}.")
    loaders = {
        Task.SEQUENCE_CLASSIFICATION: AutoPeftModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: AutoPeftModelForTokenClassification,
        Task.CAUSAL_LM: AutoPeftModelForCausalLM,
    }
    return loaders[_PEFT_TASK_TYPES[task_type]].from_pretrained(str(folder), **model_kwargs)
