"""What gets exported: the graph's backbone, the trained model it must reproduce, the soft prompt and the limits.

The caller's model is never changed: a LoRA-style adapter is merged into a deep copy (weights tied to an adapted
module are untied first, so the merge is exact), the reference outputs come from the unmerged model, and training
mode is restored after the export.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from hf_distill.export.batches import EvalBatches
from hf_distill.export.inputs import graph_positions, is_regression
from hf_distill.export.validate import Reference, torch_logits
from hf_distill.loading import load_model
from hf_distill.prompts import check_peft_combination, prompt_embeddings
from hf_distill.tasks import Task, infer_task


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and give every submodule its own training flag back afterwards."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _untie_adapted_weights(model: nn.Module) -> bool:
    """Give every parameter that is shared with an adapted layer (``...base_layer.weight``) its own copy.

    With tied embeddings (``tie_word_embeddings=True``) ``lm_head`` and the input embeddings share one matrix; merging
    a LoRA adapter of either (or both) into it would change the other too. Returns whether anything was untied.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    untied = False
    for names in owners.values():
        if len(names) < 2 or not any(".base_layer." in n for n in names):
            continue
        for name in names[1:]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone(), requires_grad=False))
        untied = True
    return untied


def merge_adapter(model: nn.Module, in_place: bool = False) -> PreTrainedModel:
    """The transformers model with a LoRA-style PEFT adapter folded into its weights.

    The argument is left as it is unless ``in_place`` (for a model the export loaded itself).
    """
    merged_from = model if in_place else copy.deepcopy(model)
    untied = _untie_adapted_weights(merged_from)
    merged = merged_from.merge_and_unload()
    if untied:  # the exported config must not promise tied weights the graph no longer has
        merged.config.tie_word_embeddings = False
    return merged


def load_for_export(model_or_dir: PreTrainedModel | nn.Module | str | os.PathLike) -> tuple[nn.Module, Any]:
    """The model and, for a folder, its tokenizer. PEFT models stay wrapped (see :class:`ExportPlan`).

    Raises:
        ValueError: prefix tuning (it lives in the attention cache), or an object that is no transformers model.
    """
    tokenizer = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, tokenizer = load_model(model_or_dir, purpose="export")
    else:
        model = model_or_dir
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        check_peft_combination(model)
        if type(config).__name__ == "PrefixTuningConfig":
            raise ValueError(
                "Prefix tuning lives in the attention cache, which the exported graph does not take; "
                "export prompt-tuned, p-tuned or LoRA students."
            )
    elif config is None and not isinstance(model, PreTrainedModel):
        raise ValueError(f"export_onnx needs a transformers PreTrainedModel or its folder, got {type(model).__name__}.")
    return model, tokenizer


def load_for_inference(path: str | os.PathLike) -> nn.Module:
    """A saved model or adapter folder as PyTorch runs it in the benchmark: LoRA merged, eval mode."""
    model, _ = load_for_export(path)
    config = getattr(model, "active_peft_config", None)
    if config is not None and not config.is_prompt_learning:
        model = merge_adapter(model, in_place=True)
    return model.eval()


@dataclass
class ExportPlan:
    """What gets exported: the transformers model, its reference (the unmerged / PEFT model) and its soft prompt."""

    model: PreTrainedModel  # the graph's backbone (merged, for LoRA)
    reference: nn.Module  # the trained model whose outputs the export must reproduce
    tokenizer: Any
    task: Task
    max_length: int  # the tokenizer's truncation: min(requested, max_positions)
    max_positions: int  # the longest input the graph takes: usable positions less the virtual tokens
    prompt: torch.Tensor | None = None
    prompt_as_input: bool = False
    adapter: str = "default"
    merged: bool = False

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[0])

    @property
    def regression(self) -> bool:
        return self.task is Task.SEQUENCE_CLASSIFICATION and is_regression(self.model.config)

    @classmethod
    def create(cls, loaded: nn.Module, tokenizer: Any, prompt_mode: str, max_length: int) -> ExportPlan:
        task = infer_task(loaded)
        config = getattr(loaded, "active_peft_config", None)
        if config is None or not config.is_prompt_learning:  # a LoRA-style adapter is merged by merge()
            positions = graph_positions(loaded.config)
            return cls(loaded, loaded, tokenizer, task, min(max_length, positions), positions)
        with torch.no_grad():
            prompt = prompt_embeddings(loaded).float().cpu()
        base = loaded.base_model
        positions = graph_positions(base.config, prompt.shape[0])
        return cls(
            base,
            loaded,
            tokenizer,
            task,
            min(max_length, positions),
            positions,
            prompt,
            prompt_mode == "input",
            loaded.active_adapter,
        )

    def with_prompt(self, batches: EvalBatches) -> EvalBatches:
        if self.prompt_as_input:
            for feed in batches.inputs:
                feed["prompt_embeds"] = self.prompt.numpy()
        return batches

    @torch.no_grad()
    def merge(self, batches: EvalBatches, reference: Reference, in_place: bool) -> None:
        """Fold a LoRA-style adapter into the graph's weights, once the reference outputs are taken from the
        unmerged model; refuse a merge that does not reproduce them.

        Raises:
            ValueError: the merged model's logits on the first validation batch differ by more than 1e-4 (relative
                to the logits' scale).
        """
        config = getattr(self.model, "active_peft_config", None)
        if config is None or config.is_prompt_learning:
            return
        self.model, self.merged = merge_adapter(self.model, in_place=in_place).eval(), True
        merged = torch_logits(self.model, batches.inputs[0], self.task, 0)
        expected = reference.logits[0]
        delta = float(np.abs(merged - expected).max())
        if not delta <= 1e-4 * max(1.0, float(np.abs(expected).max())):
            raise ValueError(
                f"Merging the adapter changes the logits by up to {delta:.3g} on the first validation batch, so the "
                "exported graph would not be the trained student. Nothing was written. Check which modules the "
                "adapter targets (weights shared between modules, custom layers), or export the unmerged base."
            )
