"""Prompt refinement (提示词精炼) with PEFT: soft-prompt / p-tuning / LoRA students and named task prompts.

PEFT does the work (adapters, freezing, saving); this module picks sensible configs, rejects combinations that
cannot run, and gives multi-task prompts on one frozen backbone a small API.
"""

from __future__ import annotations

import os
from typing import Any

from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from torch import nn

from hf_distill.tasks import Task, infer_task

_TASK_TYPES = {
    Task.SEQUENCE_CLASSIFICATION: TaskType.SEQ_CLS,
    Task.TOKEN_CLASSIFICATION: TaskType.TOKEN_CLS,
    Task.CAUSAL_LM: TaskType.CAUSAL_LM,
}
METHODS = ("prompt_tuning", "p_tuning", "lora", "prefix_tuning")


def prompt_refine_config(
    task: Task | str,
    num_virtual_tokens: int = 16,
    init_text: str | None = None,
    *,
    method: str = "prompt_tuning",
    tokenizer_name_or_path: str | None = None,
    init: str | None = None,
    lora_r: int = 8,
    target_modules: list[str] | None = None,
) -> PeftConfig:
    """A PEFT config for refining a student cheaply.

    ``method``: ``prompt_tuning`` (Lester et al.; init from ``init_text``, a vocabulary sample, or random),
    ``p_tuning`` (an MLP prompt encoder, Liu et al.), ``lora`` (rank ``lora_r``) or ``prefix_tuning`` (decoder LMs
    only under transformers 5). Classification heads are trained too (PEFT's ``modules_to_save``).
    """
    task = Task(task)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}.")
    task_type = _TASK_TYPES[task]
    if method == "lora":
        return LoraConfig(
            task_type=task_type,
            r=lora_r,
            lora_alpha=2 * lora_r,
            lora_dropout=0.05,
            target_modules=target_modules or "all-linear",
        )
    if method == "p_tuning":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=128)
    if method == "prefix_tuning":
        if task is not Task.CAUSAL_LM:
            raise ValueError(_PREFIX_ERROR)
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    init = init or ("text" if init_text else "sample_vocab")
    if init == "text":
        if not init_text or not tokenizer_name_or_path:
            raise ValueError(
                "Text initialisation needs init_text and tokenizer_name_or_path (the student's tokenizer)."
            )
        return PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=init_text,
            tokenizer_name_or_path=tokenizer_name_or_path,
        )
    inits = {"sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}
    if init not in inits:
        raise ValueError(f"Unknown prompt init {init!r}; choose 'text', 'sample_vocab' or 'random'.")
    return PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=inits[init]
    )


_PREFIX_ERROR = (
    "Prefix tuning needs past key values, which encoder models (BERT, RoBERTa, ...) do not support under "
    "transformers 5. Use method='prompt_tuning' (PromptTuningConfig), 'p_tuning' (PromptEncoderConfig) or 'lora' "
    "(LoraConfig) for this student, or prefix tuning on a decoder LM."
)


def check_peft_combination(model: nn.Module, config: PeftConfig | None = None) -> None:
    """Raise a clear error for PEFT setups that cannot run (prefix tuning on encoders)."""
    config = config or getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if isinstance(config, PrefixTuningConfig) and infer_task(model) is not Task.CAUSAL_LM:
        raise ValueError(_PREFIX_ERROR)


def make_peft_student(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """``get_peft_model`` with the checks above; only the adapter (and ``modules_to_save``) stays trainable."""
    check_peft_combination(model, config)
    return get_peft_model(model, config, adapter_name=adapter_name)


def num_virtual_tokens(model: nn.Module) -> int:
    """Positions a prompt-learning PEFT model prepends to the input (0 for LoRA or a plain model)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not isinstance(model, PeftModel):
        model = model.module
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if isinstance(config, PrefixTuningConfig):
        return 0  # prefixes live in the key/value cache, not in the output positions
    return int(config.num_virtual_tokens)


# --- several task prompts on one frozen backbone -----------------------------------------------------------------


def save_prompt(model: PeftModel, folder: str | os.PathLike, name: str) -> str:
    """Save the adapter ``name`` (e.g. a task's soft prompt) to ``folder/name``; returns that folder."""
    if name not in model.peft_config:
        raise ValueError(f"No prompt named {name!r}; this model has {sorted(model.peft_config)}.")
    model.save_pretrained(str(folder), selected_adapters=[name])
    # PEFT writes the default adapter at the top level and others in a subfolder of their name.
    return str(folder) if name == "default" else os.path.join(str(folder), name)


def load_prompt(model: PeftModel, folder: str | os.PathLike, name: str, activate: bool = True) -> PeftModel:
    """Load a saved prompt into the running model under ``name`` (the backbone is not reloaded)."""
    if not os.path.isfile(os.path.join(str(folder), "adapter_config.json")):
        raise ValueError(f"No saved prompt in {str(folder)!r} (adapter_config.json missing).")
    model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    if activate:
        use_prompt(model, name)
    return model


def use_prompt(model: PeftModel, name: str) -> PeftModel:
    """Switch the active task prompt."""
    if name not in model.peft_config:
        raise ValueError(f"No prompt named {name!r}; loaded prompts: {sorted(model.peft_config)}.")
    model.set_adapter(name)
    return model


def prompt_embeddings(model: PeftModel, name: str | None = None) -> Any:
    """The learned virtual-token embeddings ``[num_virtual_tokens, hidden]`` of a prompt-learning adapter.

    What PEFT's forward prepends: in inference mode (a prompt loaded from disk, ``is_trainable=False``) the stored
    embeddings, for every prompt method — a loaded p-tuning encoder has no MLP head, its saved output is the
    prompt; in training mode the prompt encoder's output (p-tuning's MLP applied).
    """
    name = name or model.active_adapter
    config = model.peft_config[name]
    if not config.is_prompt_learning or isinstance(config, PrefixTuningConfig):
        raise ValueError(f"Adapter {name!r} is {config.peft_type}; only prompt tuning / p-tuning have input prompts.")
    if config.inference_mode:
        return model.prompt_encoder[name].embedding.weight.detach()
    return model.get_prompt_embedding_to_save(name).detach()
