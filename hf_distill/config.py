"""`DistillationConfig`: `TrainingArguments` plus the knobs of knowledge distillation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from hf_distill.losses import HIDDEN_LOSSES, KD_LOSSES

ATTENTION_LOSSES = ("auto", "attention_kl", "value_relation")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments of :class:`~hf_distill.DistillationTrainer`.

    The total loss is ``alpha · kd_loss + (1 − alpha) · hard_loss + hidden_loss_weight · hidden_loss +
    attention_loss_weight · attention_loss``. Each component is a mean over the positions it covers (loss positions
    for the first two, attention-mask tokens for the layer terms) of the whole accumulated batch on all ranks.
    ``label_smoothing_factor`` applies to the hard loss of single-label heads, as in ``Trainer``.
    """

    temperature: float = field(
        default=2.0,
        metadata={
            "help": "Softmax temperature T of the soft targets (> 0). Higher T exposes the teacher's "
            "'dark knowledge' in small probabilities."
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the soft (KD) term in [0, 1]; the hard-label loss gets 1 - alpha. "
            "alpha=1 trains on the teacher alone and needs no labels."
        },
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": f"Soft-target divergence, one of {sorted(KD_LOSSES)}."},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Interpolation of the generalised JSD in [0, 1] (kd_loss='jsd'): 0 is forward KL, 1 is reverse KL."
        },
    )
    skew_lambda: float = field(
        default=0.1,
        metadata={"help": "Skew of DistiLLM's skew_kl / skew_reverse_kl in [0, 1); 0 gives plain KL."},
    )
    scale_by_t2: bool = field(
        default=True,
        metadata={"help": "Multiply the soft loss by T² (Hinton et al.) so gradient size does not change with T."},
    )
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of hidden-state matching (0 disables it; needs an online teacher)."},
    )
    hidden_loss: str = field(
        default="mse",
        metadata={"help": f"Hidden-state loss, one of {sorted(HIDDEN_LOSSES)}."},
    )
    layer_map: dict | str | None = field(
        default=None,
        metadata={
            "help": "Student hidden-state index -> teacher hidden-state index (0 is the embedding output, "
            'i the output of layer i), as a dict or a JSON string like \'{"1": 2, "2": 4}\'. Default: '
            "uniform, student layer i -> teacher layer i * L_teacher / L_student."
        },
    )
    attention_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of attention transfer (0 disables it; needs an online teacher)."},
    )
    attention_loss: str = field(
        default="auto",
        metadata={
            "help": f"Attention transfer, one of {list(ATTENTION_LOSSES)}: KL between attention maps "
            "(TinyBERT) or between value relations (MiniLM, seq x seq, works across widths and head counts). "
            "'auto': value relations when the student is narrower or has other head counts than the teacher, "
            "attention maps otherwise."
        },
    )
    attention_layers: str = field(
        default="last",
        metadata={
            "help": "Which student layers the attention loss matches: 'last' (MiniLM) or 'all' (through layer_map)."
        },
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the frozen teacher, e.g. 'bfloat16' (halves its memory); None keeps its own."},
    )
    kd_chunk_size: int = field(
        default=64,
        metadata={
            "help": "Positions per chunk of the KD loss (>= 0). The divergence and its gradient are computed a chunk "
            "at a time, so its intermediates take chunk x vocabulary floats instead of several batch x seq x "
            "vocabulary copies; values and gradients equal the unchunked loss. 0 computes it on all positions at "
            "once. 64 keeps a chunk's intermediates near 100 MB at vocabulary 49,152."
        },
    )
    teacher_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Online teacher: keep only its top-k logits per position plus the probability mass of the rest "
            "(the offline cache's representation), taken right after its forward pass, so that its full logits "
            "are not kept through the step. None keeps every logit (exact)."
        },
    )
    teacher_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Prompt distillation: this text (instructions, label descriptions, few-shot examples) is "
            "put in front of every input the teacher reads; the student reads the input alone (typically "
            "with a learned soft prompt), so the prompt's effect is distilled into the student."
        },
    )
    teacher_prompt_as: str = field(
        default="prefix",
        metadata={
            "help": "Where teacher_prompt goes: 'prefix' (its tokens before every input, after [CLS]/<bos>) or "
            "'system' (chat models: the chat template's system message, replacing the opening the template adds "
            "to the student's rows by itself)."
        },
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the teacher is given as a path or Hub id."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy share (GKD's lambda, Agarwal et al. 2024; TRL GKDTrainer's lmbda): the probability "
            "that a causal-LM batch's responses are sampled from the student itself before the divergence is taken. "
            "0 is off-policy KD on the dataset's responses."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD inside training (GKD's seq_kd): batches that stay off-policy get responses "
            "generated by the teacher instead of the dataset's."
        },
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Longest response sampled for on-policy / seq_kd batches, in tokens."}
    )
    generation_temperature: float = field(
        default=0.9, metadata={"help": "Sampling temperature of on-policy / seq_kd responses (TRL GKD's default)."}
    )
    generation_top_k: int = field(default=0, metadata={"help": "Top-k of that sampling (0: off)."})
    generation_top_p: float = field(default=1.0, metadata={"help": "Top-p of that sampling (1: off)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}. Typical values are 1 to 4.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1] (the soft-loss weight; the hard loss gets 1 - alpha), got {self.alpha}."
            )
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"Unknown kd_loss {self.kd_loss!r}. Choose one of {sorted(KD_LOSSES)}.")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}.")
        if not 0.0 <= self.skew_lambda < 1.0:
            raise ValueError(f"skew_lambda must be in [0, 1), got {self.skew_lambda}; 0.1 is DistiLLM's default.")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"Unknown hidden_loss {self.hidden_loss!r}. Choose one of {sorted(HIDDEN_LOSSES)}.")
        if self.attention_loss not in ATTENTION_LOSSES:
            raise ValueError(f"Unknown attention_loss {self.attention_loss!r}. Choose one of {list(ATTENTION_LOSSES)}.")
        if self.attention_layers not in ("last", "all"):
            raise ValueError(f"attention_layers must be 'last' or 'all', got {self.attention_layers!r}.")
        for name in ("hidden_loss_weight", "attention_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if isinstance(self.kd_chunk_size, bool) or not isinstance(self.kd_chunk_size, int) or self.kd_chunk_size < 0:
            raise ValueError(
                f"kd_chunk_size must be an integer >= 0 (positions per chunk of the KD loss), got "
                f"{self.kd_chunk_size!r}. Use e.g. 64, or 0 to compute the loss on all positions at once."
            )
        if self.teacher_top_k is not None and (not isinstance(self.teacher_top_k, int) or self.teacher_top_k < 1):
            raise ValueError(
                f"teacher_top_k must be an integer >= 1 (logits kept per position), got {self.teacher_top_k!r}. Use "
                "e.g. 50, or None to keep every logit."
            )
        if self.teacher_dtype is not None and self.teacher_dtype not in _DTYPES:
            raise ValueError(f"Unknown teacher_dtype {self.teacher_dtype!r}. Choose one of {sorted(_DTYPES)}.")
        self.layer_map = self._parse_layer_map(self.layer_map)
        if self.teacher_prompt is not None and not self.teacher_prompt.strip():
            raise ValueError("teacher_prompt is empty; pass the prompt text or leave it unset (None).")
        if self.teacher_prompt_as not in ("prefix", "system"):
            raise ValueError(f"teacher_prompt_as must be 'prefix' or 'system', got {self.teacher_prompt_as!r}.")
        self._check_generation()

    def _check_generation(self) -> None:
        if not isinstance(self.seq_kd, bool):
            raise ValueError(f"seq_kd must be True or False, got {self.seq_kd!r} ({type(self.seq_kd).__name__}).")
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, int | float) or self.lmbda != self.lmbda:
            raise ValueError(f"lmbda must be a number in [0, 1] (the share of on-policy batches), got {self.lmbda!r}.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy batches), got {self.lmbda}.")
        if self.lmbda > 0 and self.alpha < 1:
            raise ValueError(
                f"lmbda={self.lmbda} trains on the student's own samples, whose labels are its own tokens: a hard "
                f"loss on them (alpha={self.alpha}) teaches nothing. Set alpha=1.0, as GKD does."
            )
        if self.max_new_tokens < 1 or self.generation_temperature <= 0 or not 0 < self.generation_top_p <= 1:
            raise ValueError(
                "max_new_tokens must be >= 1, generation_temperature > 0 and generation_top_p in (0, 1]; got "
                f"{self.max_new_tokens}, {self.generation_temperature}, {self.generation_top_p}."
            )

    @staticmethod
    def _parse_layer_map(value: dict[int, int] | str | None) -> dict[int, int] | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"layer_map must be a JSON object like '{{\"1\": 2}}', got {value!r}.") from err
        if not isinstance(value, dict) or not value:
            raise ValueError(f"layer_map must be a non-empty mapping student index -> teacher index, got {value!r}.")
        try:
            return {int(k): int(v) for k, v in value.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"layer_map keys and values must be integers, got {value!r}.") from err

    @property
    def torch_teacher_dtype(self) -> torch.dtype | None:
        return None if self.teacher_dtype is None else _DTYPES[self.teacher_dtype]

    def loss_weight(self, name: str) -> float:
        """Weight of a loss component (``kd_loss``, ``hard_loss``, ``hidden_loss``, ``attention_loss``) in the total."""
        weights = {
            "kd_loss": self.alpha,
            "hard_loss": 1.0 - self.alpha,
            "hidden_loss": self.hidden_loss_weight,
            "attention_loss": self.attention_loss_weight,
        }
        if name not in weights:
            raise ValueError(f"Unknown loss component {name!r}; the components are {sorted(weights)}.")
        return weights[name]

    def kd_params(self) -> dict[str, float]:
        """Extra parameters of the chosen KD loss."""
        if self.kd_loss == "jsd":
            return {"jsd_beta": self.jsd_beta}
        if self.kd_loss.startswith("skew"):
            return {"skew_lambda": self.skew_lambda}
        return {}
