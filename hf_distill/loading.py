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
        ValueError: ``source`` is a file, a folder without ``config.json``/``adapter_config.json``, an
            architecture that is not sequence classification, token classification or causal LM, or files that
            cannot be read (corrupt or truncated weights, config or tokenizer) — one line naming the problem.
    """
    path = Path(source).expanduser()
    if path.is_file():
        hint = (
            " A .gguf model becomes one with hf_distill.gguf.convert_gguf(path, cache_dir) (or give it to "
            "DistillationTrainer / hf-distill as a teacher, which converts it)."
            if str(source).lower().endswith(".gguf")
            else ""
        )
        raise ValueError(f"Model path {str(source)!r} is a file; pass the folder written by save_pretrained.{hint}")
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
        model = _readable(source, "the model", lambda: AUTO_CLASSES[task].from_pretrained(str(source), **model_kwargs))
    return model, (load_tokenizer(path if path.is_dir() else str(source)) if with_tokenizer else None)


def _readable(source: str | os.PathLike, what: str, load: Any) -> Any:
    """``load()``, with any failure to read the files (safetensors, JSON, OS errors) as one clear ValueError."""
    try:
        return load()
    except Exception as err:  # safetensors, tokenizers, json and the Hub client raise their own types
        raise ValueError(_unreadable(source, what, err)) from err


def _unreadable(source: str | os.PathLike, what: str, err: BaseException) -> str:
    reason = (str(err).strip().splitlines() or [""])[0][:300]
    return (
        f"Cannot load {what} in {str(source)!r} ({type(err).__name__}: {reason}). The files are corrupt, incomplete "
        "or not a transformers checkpoint: save the model again (save_pretrained / trainer.save_model)."
    )


def _looks_like_path(source: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything absolute, relative (./, ../, ~) or deeper is a local path."""
    return source.startswith((".", "/", "~")) or os.path.isabs(source) or source.count("/") > 1 or "\\" in source


# Files that mean "this folder has a tokenizer": a failure to load one is an error, not "no tokenizer".
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def load_tokenizer(source: str | os.PathLike) -> Any:
    """The tokenizer saved with a model, or None when the folder holds none.

    Raises:
        ValueError: the folder holds tokenizer files that cannot be loaded (corrupt or truncated).
    """
    from transformers import AutoTokenizer

    path = Path(source)
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as err:  # tokenizers raises a plain Exception for a corrupt tokenizer.json
        if path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(_unreadable(source, "the tokenizer", err)) from err
        return None


def _task_of_saved(source: str, purpose: str) -> Task:
    from transformers import AutoConfig

    config = _readable(Path(source) / "config.json", "config.json", lambda: AutoConfig.from_pretrained(source))
    architecture = (config.architectures or ["?"])[0]
    return task_from_architecture(architecture, purpose)


def _load_adapter(folder: Path, task: Task | str | None, model_kwargs: dict[str, Any]) -> nn.Module:
    from peft import (
        AutoPeftModelForCausalLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
        PeftConfig,
    )

    config = _readable(folder / ADAPTER_CONFIG, ADAPTER_CONFIG, lambda: PeftConfig.from_pretrained(str(folder)))
    task_type = str(config.task_type)
    if task_type not in _PEFT_TASK_TYPES:
        raise ValueError(f"Cannot load a PEFT adapter of task type {task_type}; supported: {sorted(_PEFT_TASK_TYPES)}.")
    if task is not None and Task(task) is not _PEFT_TASK_TYPES[task_type]:
        raise ValueError(f"The adapter in {folder} is for {task_type}, not {Task(task).value}.")
    loaders = {
        Task.SEQUENCE_CLASSIFICATION: AutoPeftModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: AutoPeftModelForTokenClassification,
        Task.CAUSAL_LM: AutoPeftModelForCausalLM,
    }
    loader = loaders[_PEFT_TASK_TYPES[task_type]]
    return _readable(folder, "the adapter", lambda: loader.from_pretrained(str(folder), **model_kwargs))
