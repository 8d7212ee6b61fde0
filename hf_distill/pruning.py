"""Structured width pruning (Minitron, Muralidharan et al. 2024): rank units by importance, keep the best, slice.

Three kinds of units are pruned: attention heads, MLP neurons (intermediate channels) and hidden (embedding)
channels. Their importance comes from one ``torch.no_grad`` pass of the teacher over calibration batches:

- head h of a block: ``‖attention output of h‖₂`` (the input of the output projection, before it mixes heads),
  L2 over the sequence, mean over the batch;
- MLP neuron i: mean ``|activation|`` of the intermediate activations (the input of the down projection);
- hidden channel c: mean ``|output|`` of every LayerNorm/RMSNorm of hidden width, summed over the norms.

Without calibration data the ranking falls back to weight magnitude (see :func:`weight_importance`).
:func:`prune_state` then slices every weight along the kept indices, in the teacher's order, so that keeping
everything reproduces the teacher exactly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps its per-block projections (module paths inside one block)."""

    query: str
    key: str
    value: str
    attn_out: str  # reads the concatenated head outputs
    mlp_in: tuple[str, ...]  # write the intermediate activations (Llama: gate and up)
    mlp_out: str  # reads them
    attention_is_hidden: bool  # BERT: heads · head_dim must equal hidden_size; Llama: head_dim is its own field


_BERT = Family(
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    ("intermediate.dense",),
    "output.dense",
    attention_is_hidden=True,
)
_LLAMA = Family(
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj",
    attention_is_hidden=False,
)
FAMILIES = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA}


@dataclass(frozen=True)
class Widths:
    """The widths of one model: hidden channels, MLP neurons, query heads, key/value heads, size of one head."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class Importance:
    """Importance scores of one model: ``hidden`` [hidden_size]; per block ``heads`` [heads], ``neurons`` [I]."""

    hidden: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    source: str  # "activations" (Minitron) or "weight magnitude" (no calibration data)

    def select(self, layers: list[int]) -> Importance:
        """The scores of the chosen blocks only (0-based teacher indices), in the student's block order."""
        return Importance(self.hidden, [self.heads[i] for i in layers], [self.neurons[i] for i in layers], self.source)


@dataclass
class KeptUnits:
    """Indices (into the teacher's units, increasing within each group) that the student keeps."""

    hidden: torch.Tensor
    heads: list[torch.Tensor]  # query heads per block
    kv_heads: list[torch.Tensor]  # key/value heads per block
    neurons: list[torch.Tensor]


def calibration_batches(
    data: Any, model: nn.Module, pad_id: int, batch_size: int, max_batches: int, *, labels: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Model-input batches from a tokenized ``datasets.Dataset`` (rows padded right) or a list of dicts of tensors.

    Only ``input_ids``, ``attention_mask`` and (when the model takes them) ``token_type_ids`` are kept, and
    ``labels`` too when asked and present (padded with -100); at most ``max_batches`` batches. Raises ValueError for
    other data or data without ``input_ids``.
    """
    if min(batch_size, max_batches) < 1:
        raise ValueError(
            f"calibration_batch_size and num_calibration_batches must be >= 1, got {batch_size} and {max_batches}."
        )
    accepted = [k for k in MODEL_INPUTS if k in inspect.signature(model.forward).parameters]
    accepted += ["labels"] if labels else []
    if hasattr(data, "column_names") and hasattr(data, "select"):
        if "input_ids" not in data.column_names:
            raise ValueError(
                f"calibration_data has no input_ids column (columns: {data.column_names}); tokenize it first."
            )
        rows = data.select(range(min(len(data), batch_size * max_batches)))
        columns = [k for k in accepted if k in rows.column_names]
        if "labels" in columns and len(rows) and not isinstance(rows[0]["labels"], list):
            columns.remove("labels")  # class labels, not per-token targets: nothing to score a language model on
        batches = [_pad_rows(rows[i : i + batch_size], columns, pad_id) for i in range(0, len(rows), batch_size)]
    elif isinstance(data, (list, tuple)) and all(isinstance(b, dict) for b in data):
        batches = []
        for batch in data[:max_batches]:
            if "input_ids" not in batch:
                raise ValueError(f"Every calibration batch needs input_ids; got keys {sorted(batch)}.")
            batches.append({k: _as_2d(batch[k]) for k in accepted if k in batch})
    else:
        raise ValueError(
            "calibration_data must be a tokenized datasets.Dataset (with input_ids) or a list of dicts of tensors "
            f"(model inputs per batch), got {type(data).__name__}."
        )
    if not batches:
        raise ValueError("calibration_data is empty; pass a few hundred tokenized training examples.")
    return batches


def _as_2d(value: Any) -> torch.Tensor:
    """A tensor or nested list of token ids as ``[batch, seq]`` (one unbatched sequence becomes a batch of one)."""
    tensor = torch.as_tensor(value)
    return tensor.reshape(-1, tensor.shape[-1])


def _pad_rows(rows: dict[str, list], columns: list[str], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch from a dataset slice; a missing attention mask marks every given token as real."""
    ids = rows["input_ids"]
    width = max(len(r) for r in ids)
    source = {"attention_mask": [[1] * len(r) for r in ids], **rows}
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    return {
        k: torch.tensor([[int(t) for t in r] + [fill[k]] * (width - len(r)) for r in source[k]])
        for k in dict.fromkeys([*columns, "attention_mask"])
    }


class _Recorder:
    """Accumulates the Minitron statistics of one model through forward hooks; ``mask`` is set per batch."""

    def __init__(self, num_blocks: int) -> None:
        self.mask = torch.ones(1, 1)
        self.heads: list[torch.Tensor | float] = [0.0] * num_blocks
        self.neurons: list[torch.Tensor | float] = [0.0] * num_blocks
        self.norms: dict[str, torch.Tensor | float] = {}
        self.samples = 0
        self.tokens = 0.0

    def head_hook(self, block: int, num_heads: int) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].float()  # [batch, seq, heads · head_dim]
            per_token = x.reshape(*x.shape[:2], num_heads, -1).norm(dim=-1) * self.mask[..., None]
            self.heads[block] = self.heads[block] + per_token.norm(dim=1).sum(0)  # L2 over seq, summed over batch

        return hook

    def neuron_hook(self, block: int) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].float().abs() * self.mask[..., None]  # [batch, seq, intermediate]
            self.neurons[block] = self.neurons[block] + x.sum((0, 1))

        return hook

    def norm_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            x = out.float().abs() * self.mask[..., None]
            self.norms[name] = self.norms.get(name, 0.0) + x.sum((0, 1))

        return hook

    def result(self) -> Importance:
        hidden = sum(total / self.tokens for total in self.norms.values())
        return Importance(
            hidden=torch.as_tensor(hidden).cpu(),
            heads=[(torch.as_tensor(h) / self.samples).cpu() for h in self.heads],
            neurons=[(torch.as_tensor(n) / self.tokens).cpu() for n in self.neurons],
            source="activations",
        )


def hidden_norms(model: nn.Module, hidden_size: int) -> dict[str, nn.Module]:
    """Every LayerNorm/RMSNorm-like module whose only parameters are 1-D vectors of the hidden width."""
    found = {}
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and "norm" in type(module).__name__.lower() and all(p.shape == (hidden_size,) for p in params):
            found[name] = module
    return found


@contextlib.contextmanager
def _hooks(model: nn.Module, blocks: nn.ModuleList, family: Family, widths: Widths, rec: _Recorder) -> Iterator[None]:
    handles = []
    for index, block in enumerate(blocks):
        out = block.get_submodule(family.attn_out)
        handles.append(out.register_forward_pre_hook(rec.head_hook(index, widths.heads)))
        handles.append(block.get_submodule(family.mlp_out).register_forward_pre_hook(rec.neuron_hook(index)))
    for name, norm in hidden_norms(model, widths.hidden).items():
        handles.append(norm.register_forward_hook(rec.norm_hook(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_importance(
    model: nn.Module, blocks: nn.ModuleList, family: Family, widths: Widths, batches: list[dict[str, torch.Tensor]]
) -> Importance:
    """Minitron importance from one no-grad pass over ``batches``; padded positions (mask 0) do not count.

    ``widths`` are the model's own (teacher) widths. The model's train/eval mode is restored afterwards.
    """
    recorder = _Recorder(len(blocks))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks(model, blocks, family, widths, recorder):
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                recorder.mask = mask.float()  # [batch, seq]
                recorder.samples += mask.shape[0]
                recorder.tokens += float(mask.sum())
                model(**batch)
    finally:
        model.train(was_training)
    return recorder.result()


def weight_importance(model: nn.Module, blocks: nn.ModuleList, family: Family, widths: Widths) -> Importance:
    """The fallback without calibration data: weight magnitude.

    Head h: Frobenius norms of its query rows plus its output-projection columns. Neuron i: L2 norms of its
    input rows (all MLP input projections) plus its output column. Hidden channel c: L2 norm of its input-embedding
    column plus ``|γ_c|`` of every hidden-width norm.
    """
    heads, neurons = [], []
    with torch.no_grad():
        for block in blocks:
            q = block.get_submodule(family.query).weight.float().view(widths.heads, widths.head_dim, -1)
            o = block.get_submodule(family.attn_out).weight.float().view(-1, widths.heads, widths.head_dim)
            heads.append(q.norm(dim=(1, 2)) + o.norm(dim=(0, 2)))
            rows = sum(block.get_submodule(name).weight.float().norm(dim=1) for name in family.mlp_in)
            neurons.append(rows + block.get_submodule(family.mlp_out).weight.float().norm(dim=0))
        hidden = model.get_input_embeddings().weight.float().norm(dim=0)
        for norm in hidden_norms(model, widths.hidden).values():
            hidden = hidden + norm.weight.float().abs()
    return Importance(hidden.cpu(), [h.cpu() for h in heads], [n.cpu() for n in neurons], source="weight magnitude")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, increasing (so that keeping all is the identity)."""
    return torch.topk(scores, k).indices.sort().values


def choose_units(importance: Importance, teacher: Widths, student: Widths) -> KeptUnits:
    """Keep the most important units. With GQA, whole key/value groups are ranked by the summed importance of
    their query heads; inside each kept group the most important ``student.heads / student.kv_heads`` query
    heads stay, so query head h of the student still reads key/value head ``h // group`` as in transformers."""
    t_group, s_group = teacher.heads // teacher.kv_heads, student.heads // student.kv_heads
    heads, kv_heads = [], []
    for scores in importance.heads:
        groups = scores.view(teacher.kv_heads, t_group)
        kept_groups = _top(groups.sum(1), student.kv_heads)
        kv_heads.append(kept_groups)
        heads.append(torch.cat([g * t_group + _top(groups[g], s_group) for g in kept_groups.tolist()]))
    return KeptUnits(
        hidden=_top(importance.hidden, student.hidden),
        heads=heads,
        kv_heads=kv_heads,
        neurons=[_top(scores, student.intermediate) for scores in importance.neurons],
    )


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a ``[heads · head_dim, ...]`` projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _block_rules(family: Family, kept: KeptUnits, block: int, head_dim: int) -> dict[str, tuple[Any, Any]]:
    """(output-dim, input-dim) indices of each projection of one block, by its path inside the block."""
    q_rows = _head_rows(kept.heads[block], head_dim)
    kv_rows = _head_rows(kept.kv_heads[block], head_dim)
    hidden, neurons = kept.hidden, kept.neurons[block]
    rules = {family.query: (q_rows, hidden), family.key: (kv_rows, hidden), family.value: (kv_rows, hidden)}
    rules[family.attn_out] = (hidden, q_rows)
    rules.update({name: (neurons, hidden) for name in family.mlp_in})
    rules[family.mlp_out] = (hidden, neurons)
    return rules


def _module_rule(
    model: nn.Module, name: str, module: nn.Module, kept: KeptUnits, hidden_size: int, norms: dict[str, nn.Module]
) -> tuple[Any, Any] | None:
    """Indices for a module outside the per-block projections: embeddings, norms, pooler, heads, lm_head."""
    if name in norms:
        return (kept.hidden, None)
    if isinstance(module, nn.Embedding):
        return (None, kept.hidden if module.embedding_dim == hidden_size else None)
    if isinstance(module, nn.Linear):
        # The LM head's outputs are the vocabulary even if it happened to equal the hidden width.
        writes_hidden = module.out_features == hidden_size and module is not model.get_output_embeddings()
        return (kept.hidden if writes_hidden else None, kept.hidden if module.in_features == hidden_size else None)
    if all(hidden_size not in p.shape for p in module.parameters(recurse=False)):
        return (None, None)  # e.g. the MLM head's vocabulary bias: no hidden dimension to slice
    return None


def slicing_rules(
    model: nn.Module, stack: str, family: Family, kept: KeptUnits, teacher: Widths
) -> dict[str, tuple[Any, Any]]:
    """Parameter name -> (indices along dim 0, indices along dim 1), ``None`` meaning "keep that dim whole".

    Raises ValueError for a module with parameters that no rule covers (an architecture this was not written for).
    """
    norms = hidden_norms(model, teacher.hidden)
    blocks = model.get_submodule(stack)
    per_block = {
        f"{stack}.{i}.{path}": rule
        for i in range(len(blocks))
        for path, rule in _block_rules(family, kept, i, teacher.head_dim).items()
    }
    rules: dict[str, tuple[Any, Any]] = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        rule = per_block.get(name)
        # Inside a block only the known projections and the norms are sliced: refuse an unknown one, never guess.
        if rule is None and (not name.startswith(stack + ".") or name in norms):
            rule = _module_rule(model, name, module, kept, teacher.hidden, norms)
        if rule is None:
            raise ValueError(
                f"Cannot width-prune {name!r} ({type(module).__name__}): no slicing rule covers it. Width pruning "
                "supports BERT-, RoBERTa- and Llama/Qwen2/Mistral-style models."
            )
        for param_name, param in params.items():
            dim0, dim1 = rule
            rules[f"{name}.{param_name}" if name else param_name] = (dim0, dim1 if param.dim() > 1 else None)
    return rules


def prune_state(state: dict[str, torch.Tensor], rules: dict[str, tuple[Any, Any]]) -> dict[str, torch.Tensor]:
    """``state`` with every ruled tensor sliced; other entries (buffers) are cloned unchanged."""
    pruned = {}
    for key, tensor in state.items():
        dim0, dim1 = rules.get(key, (None, None))
        value = tensor.detach()
        if dim0 is not None:
            value = value.index_select(0, dim0.to(value.device))
        if dim1 is not None:
            value = value.index_select(1, dim1.to(value.device))
        pruned[key] = value.clone()
    return pruned
