"""The ONNX graph of a student: a logits-only wrapper (optionally behind a soft prompt) and the exporters."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_distill.export.inputs import graph_positions, input_names_for, reads_last_position
from hf_distill.export.variants import FUSION_TYPES
from hf_distill.tasks import Task, infer_task

logger = logging.getLogger(__name__)
_TWO_GB = 2 * 1024**3
EXPORTER_ENV = "HF_DISTILL_ONNX_EXPORTER"
EXPORTERS = ("auto", "dynamo", "torchscript")
_NAMES = {"dynamo": "Dynamo", "torchscript": "TorchScript"}


def exporter_choice() -> str:
    """The exporter ``export_graph`` uses: ``$HF_DISTILL_ONNX_EXPORTER`` — ``auto`` (default: see
    :func:`exporter_order`), ``dynamo`` or ``torchscript`` (no fallback: its error is raised; TorchScript is opset
    <= 17 and about 10× faster to export a small model on a CPU, which is why the test suite uses it).

    Raises:
        ValueError: another value.
    """
    choice = os.environ.get(EXPORTER_ENV, "auto").strip().lower() or "auto"
    if choice not in EXPORTERS:
        raise ValueError(f"{EXPORTER_ENV}={choice!r} is not an exporter; use one of {', '.join(EXPORTERS)} (or unset).")
    return choice


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch]`` index of each row's last attended position (left or right padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


class _LogitsOnly(nn.Module):
    """Export wrapper: named tensor inputs in, logits out (no KV cache, no dict outputs).

    With a soft prompt it does what PEFT's prompt-learning forward does: prepend the prompt embeddings to the input
    embeddings, extend the attention mask (and token types), and, for per-token outputs, drop the virtual positions.
    The prompt is a constant of the graph (``prompt_as_input=False``) or its input ``prompt_embeds``.
    A decoder classifier is read at the last attended position (see ``reads_last_position``), so a right-padded
    row scores as it would alone.
    """

    def __init__(self, model: PreTrainedModel, prompt: torch.Tensor | None = None, prompt_as_input: bool = False):
        super().__init__()
        self.model, self.prompt_as_input = model, prompt_as_input
        self.baked = None if prompt is None or prompt_as_input else nn.Parameter(prompt, requires_grad=False)
        self.causal = infer_task(model) is Task.CAUSAL_LM
        self.last_position = reads_last_position(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"use_cache": False} if self.causal or self.last_position else {}
        prompt = prompt_embeds if self.prompt_as_input else self.baked
        virtual = 0 if prompt is None else prompt.shape[0]
        if prompt is None:
            kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
        else:
            batch = input_ids.shape[0]
            embeds = self.model.get_input_embeddings()(input_ids)
            prompts = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompts, embeds], 1)
            kwargs["attention_mask"] = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], 1)
        if token_type_ids is not None:  # the virtual positions belong to the first segment, as in PEFT
            zeros = token_type_ids.new_zeros(token_type_ids.shape[0], virtual)
            kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], 1) if virtual else token_type_ids
        if self.last_position:
            return self._score_last_attended(kwargs)
        logits = self.model(**kwargs).logits
        return logits[:, virtual:] if logits.dim() == 3 else logits

    def _score_last_attended(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The classifier head (``score``) on the backbone's hidden state at each row's last attended position."""
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(**kwargs).last_hidden_state
        last = last_attended(kwargs["attention_mask"])
        return self.model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def export_graph(
    model: PreTrainedModel,
    path: str,
    opset: int = 18,
    prompt: torch.Tensor | None = None,
    prompt_as_input: bool = False,
) -> str:
    """Write ``model`` (optionally behind a soft prompt) as ONNX with dynamic batch and sequence axes.

    Tries the exporters of :func:`exporter_order` (dynamo, i.e. torch.export, and TorchScript; BERT-family encoders
    TorchScript first) and returns the one that succeeded; ``$HF_DISTILL_ONNX_EXPORTER`` pins one
    (:func:`exporter_choice`). Eager attention is used for export: its graph is what onnxruntime's fusions recognise.
    """
    previous = getattr(model.config, "_attn_implementation", "eager")
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        return _export_graph(model, path, opset, prompt, prompt_as_input)
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


def _export_graph(
    model: PreTrainedModel, path: str, opset: int, prompt: torch.Tensor | None, prompt_as_input: bool
) -> str:
    names = input_names_for(model, prompt_as_input)
    sample = {
        "input_ids": torch.full((2, 8), 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 8, dtype=torch.long),
        "prompt_embeds": prompt,
    }
    kwargs = {n: sample[n] for n in names}
    wrapper = _LogitsOnly(model, prompt, prompt_as_input).eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _TWO_GB * 0.9
    order = exporter_order(exporter_choice(), model.config)
    for attempt, exporter in enumerate(order):
        try:
            if exporter == "dynamo":
                max_positions = graph_positions(model.config, 0 if prompt is None else prompt.shape[0])
                _export_dynamo(wrapper, path, kwargs, opset, max_positions, big)
            else:
                per_token = infer_task(model) is not Task.SEQUENCE_CLASSIFICATION
                _export_torchscript(wrapper, path, kwargs, opset, per_token, big)
            return exporter
        except Exception as err:  # the fallback exists for whatever one exporter cannot trace
            if attempt == len(order) - 1:
                raise
            logger.warning(
                "%s ONNX export failed (%s: %s); falling back to the %s exporter.",
                _NAMES[exporter],
                type(err).__name__,
                str(err).splitlines()[0][:300],
                _NAMES[order[attempt + 1]],
            )
            for leftover in Path(path).parent.glob(Path(path).name + "*"):
                leftover.unlink()
    raise AssertionError("unreachable: the last exporter raises")


def exporter_order(choice: str, config: Any) -> tuple[str, ...]:
    """The exporters ``export_graph`` tries, in order, for ``$HF_DISTILL_ONNX_EXPORTER`` = ``choice``.

    ``auto`` puts TorchScript first for the encoder families onnxruntime's BERT fusions know: its attention graph is
    what those fusions match (one ``Attention`` / ``QAttention`` node per layer), dynamo's is not — measured on a
    3-layer MiniLM student, int8, batch 1 x 64, Intel Xeon (VNNI): 1.35 ms against 1.59 ms. Other models go dynamo
    first. Each falls back to the other exporter.
    """
    if choice != "auto":
        return (choice,)
    if FUSION_TYPES.get(getattr(config, "model_type", "")) == "bert":
        return ("torchscript", "dynamo")
    return ("dynamo", "torchscript")


def _token_inputs(kwargs: dict[str, Any]) -> list[str]:
    return [n for n in kwargs if n != "prompt_embeds"]


def _onnx_export(wrapper: nn.Module, path: str, kwargs: dict[str, Any], **options: Any) -> None:
    """torch.onnx.export of the logits-only wrapper, its (harmless, noisy) tracer warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (), path, kwargs=kwargs, input_names=list(kwargs), output_names=["logits"], **options
        )


def _export_dynamo(
    wrapper: nn.Module, path: str, kwargs: dict[str, Any], opset: int, max_positions: int, big: bool
) -> None:
    """torch.export with dynamic batch and sequence axes (the sequence up to the graph's usable positions)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=max_positions)
    shapes = {n: ({0: batch, 1: seq} if n in _token_inputs(kwargs) else None) for n in kwargs}
    _onnx_export(
        wrapper,
        path,
        kwargs,
        dynamo=True,
        dynamic_shapes=shapes,
        opset_version=opset,
        external_data=big,
        optimize=True,
        verbose=False,
    )


def _export_torchscript(
    wrapper: nn.Module, path: str, kwargs: dict[str, Any], opset: int, per_token: bool, big: bool
) -> None:
    """The TorchScript exporter (opset <= 17): first for BERT-family encoders, else for graphs torch.export cannot
    trace."""
    logits_axes = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    axes = {**{n: {0: "batch", 1: "sequence"} for n in _token_inputs(kwargs)}, "logits": logits_axes}
    _onnx_export(wrapper, path, kwargs, dynamo=False, dynamic_axes=axes, opset_version=min(opset, 17))
    if big:
        import onnx

        onnx.save(onnx.load(path), path, save_as_external_data=True, location=Path(path).name + ".data")
