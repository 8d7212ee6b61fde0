"""`DistillationTrainer`: a `transformers.Trainer` whose loss adds a frozen teacher's soft targets."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_distill.cache import CACHE_COLUMNS, CachedLogitsCollator, teacher_logits_from_cache
from hf_distill.config import DistillationConfig
from hf_distill.forward import accepted_inputs, input_position_logits, run_model
from hf_distill.intermediate import IntermediateMatcher
from hf_distill.losses import distillation_loss, masked_mean
from hf_distill.preflight import validate_cached_dataset, validate_setup
from hf_distill.prompts import num_virtual_tokens
from hf_distill.tasks import Task, align_logits, infer_task
from hf_distill.teacher import load_teacher

PROJECTIONS_FILE = "distillation_projections.safetensors"


class DistillationTrainer(Trainer):
    """Trains ``model`` (the student) on ``alpha·KD + (1 − alpha)·CE`` (+ hidden-state and attention matching).

    ``teacher`` is a model, a path or Hub id (loaded with the student's Auto class, no remote code), or None to
    train from teacher logits cached in the dataset by :func:`~hf_distill.cache_teacher_logits`. The teacher is
    frozen, kept in eval mode, run under ``torch.no_grad`` and placed by Accelerate on the student's device; it is
    never seen by the optimizer nor saved. Evaluation and ``predict`` behave as with ``Trainer``, for the student.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("DistillationTrainer needs the student as `model=`.")
        if not isinstance(args, DistillationConfig):
            raise ValueError(
                f"args must be a DistillationConfig (got {type(args).__name__}); it holds temperature, alpha, kd_loss."
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            raise ValueError(
                f"Launched with {launched} processes but TrainingArguments set up a single, non-distributed one: "
                "every rank would train on the same batches. On a machine without GPUs pass use_cpu=True "
                "(--use_cpu true) so that Accelerate starts gloo ranks (DistributedType.MULTI_CPU)."
            )
        self.task = infer_task(model)
        processing_class = kwargs.get("processing_class")
        if isinstance(teacher, str):
            teacher = load_teacher(teacher, args, self.task)
        # Every check runs before Trainer builds optimizers, dataloaders or moves weights.
        validate_setup(
            model,
            teacher,
            args,
            self.task,
            kwargs.get("train_dataset"),
            processing_class,
            eval_dataset=kwargs.get("eval_dataset"),
        )
        # Prompt-learning PEFT students prepend virtual positions to their outputs; they never meet a teacher token.
        self.num_virtual_tokens = num_virtual_tokens(model)
        self.teacher_prompt = TeacherPrompt(args.teacher_prompt, processing_class) if args.teacher_prompt else None
        self.matcher = IntermediateMatcher(model, teacher, args, self.task) if teacher is not None else None
        if self.matcher is not None and self.matcher.projections is not None:
            # A submodule of the student so that DDP syncs it and the optimizer trains it; excluded from every save.
            model.add_module(IntermediateMatcher.ATTRIBUTE, self.matcher.projections)
            model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or set()) | {
                f"{IntermediateMatcher.ATTRIBUTE}.{k}" for k in self.matcher.projections.state_dict()
            }
        super().__init__(model=model, args=args, **kwargs)
        self.data_collator = CachedLogitsCollator(self.data_collator)
        # num_items_in_batch (labelled positions over the accumulated batch, all ranks) normalises our loss, so the
        # update of batch 8 × accumulation 1 equals that of batch 4 × accumulation 2.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.teacher = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if args.torch_teacher_dtype is not None:
                teacher.to(args.torch_teacher_dtype)
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._components: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # --- data ------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # Keep what the teacher reads (token_type_ids for a BERT teacher of a DistilBERT student) and the cached
        # teacher columns when unused columns are removed; run_model gives each model only its own inputs.
        teacher = getattr(self, "teacher", None)  # set after Trainer.__init__, which may already ask
        teacher_inputs = sorted(accepted_inputs(teacher)) if teacher is not None else []
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *teacher_inputs, *CACHE_COLUMNS]))

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``Trainer.evaluate``; without a teacher, an ``eval_dataset`` passed here is checked like those at init.

        Raises:
            ValueError: ``teacher=None`` and the dataset (or one of a dict of them) holds no valid teacher cache.
        """
        if self.teacher is None and eval_dataset is not None and not isinstance(eval_dataset, str):
            named = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
            for key, dataset in named.items():
                name = "eval dataset" if key is None else f"eval dataset {key!r}"
                validate_cached_dataset(self.model, self.args, self.task, dataset, name)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    # --- model calls: each model gets its own inputs; positions and pooling follow the attention mask ----------

    def student_forward(self, model: nn.Module, inputs: dict[str, Any], **options: Any) -> tuple[Any, torch.Tensor]:
        """The student's output and its logits on the input's positions (soft-prompt positions dropped).

        Logits are ``[batch, classes]`` (sequence classification) or ``[batch, seq, classes]``.
        """
        outputs = run_model(model, inputs, **options)
        return outputs, input_position_logits(model, outputs.logits)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``Trainer.prediction_step``; batches without labels (``predict`` on new data) run the student alone.

        Through :meth:`student_forward`, like training: no teacher or cache columns reach the student, a decoder
        classifier scores the last attended position, and the logits are those of the input positions.
        """
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        if has_labels or not self.label_names:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            _, logits = self.student_forward(model, inputs)
        return None, None if prediction_loss_only else logits.detach(), None

    # --- loss ------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        args: DistillationConfig = self.args
        cached = {k: inputs.pop(k) for k in CACHE_COLUMNS if k in inputs}
        labels = inputs.pop("labels", None)
        want_hidden = self.matcher is not None and self.matcher.needs_hidden
        want_attn = self.matcher is not None and self.matcher.needs_attentions
        extra = {"output_hidden_states": True} if want_hidden else {}
        if want_attn:
            extra["output_attentions"] = True
        if self.task is Task.CAUSAL_LM:
            extra["use_cache"] = False  # a KV cache is dead weight in a single training forward
        with self.matcher.capture_values(model, "student") if self.matcher else contextlib.nullcontext():
            outputs, student_logits = self.student_forward(model, inputs, **extra)
        teacher_outputs = None
        if self.teacher is not None:
            if self.teacher.training:  # a teacher sharing a PEFT student's frozen base follows model.train()
                self.teacher.eval()
            teacher_inputs = self.teacher_prompt.prepend(inputs) if self.teacher_prompt else inputs
            with torch.no_grad(), self.matcher.capture_values(self.teacher, "teacher"):
                teacher_outputs = run_model(self.teacher, teacher_inputs, **extra)
            teacher_logits = input_position_logits(self.teacher, teacher_outputs.logits)
            if self.teacher_prompt is not None and self.task is Task.CAUSAL_LM:
                teacher_logits = self.teacher_prompt.drop_prompt_positions(teacher_logits)
        else:
            teacher_logits = teacher_logits_from_cache(cached, student_logits.shape[-1], args.temperature)

        aligned = align_logits(self.task, student_logits, teacher_logits, labels, inputs.get("attention_mask"))
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        # Label-level terms are sums over positions divided by the labelled positions of the whole accumulated
        # batch (Trainer's num_items_in_batch, all ranks), so batch 8 × accumulation 1 gives the update of 4 × 2.
        # DDP then averages gradients over ranks while that count spans all ranks: multiply back, as Trainer does.
        rank_scale = 1
        if num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, device=aligned.student.device, dtype=torch.float32)
            if args.average_tokens_across_devices:
                rank_scale = self.accelerator.num_processes
        else:
            denominator = aligned.mask.sum().float().clamp_min(1) * steps
        label_terms: dict[str, torch.Tensor] = {}
        if args.alpha > 0:
            label_terms["kd_loss"] = (
                distillation_loss(
                    aligned.student,
                    aligned.teacher,
                    loss=args.kd_loss,
                    temperature=args.temperature,
                    mask=aligned.mask,
                    scale_by_t2=args.scale_by_t2,
                    reduction="sum",
                    **args.kd_params(),
                )
                / denominator
                * rank_scale
            )
        if args.alpha < 1:
            label_terms["hard_loss"] = self.hard_loss(aligned.student, aligned.labels, aligned.mask) / denominator
            label_terms["hard_loss"] = label_terms["hard_loss"] * rank_scale
        total = sum(
            (args.alpha if name == "kd_loss" else 1 - args.alpha) * value for name, value in label_terms.items()
        )
        # Hidden/attention terms are per-token means of this micro-batch; DDP's gradient mean is already right.
        layer_terms: dict[str, torch.Tensor] = {}
        if teacher_outputs is not None and self.matcher is not None:
            layer_losses = self.matcher.losses(
                outputs, teacher_outputs, inputs.get("attention_mask"), student_offset=self.num_virtual_tokens
            )
            for name, value in layer_losses.items():
                layer_terms[name] = value / steps
                total = total + self.matcher.weight(name) * layer_terms[name]
        self._record(label_terms | layer_terms, steps, model.training)
        if not return_outputs:
            return total
        # prediction_step turns every output field into "predictions": hand it the logits alone, as plain Trainer does.
        return total, type(outputs)(loss=total.detach(), logits=student_logits)

    def hard_loss(self, logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy against the labels (MSE for single-output regression heads)."""
        if labels is None:
            raise ValueError("alpha < 1 needs labels in every batch; set alpha=1.0 to train on the teacher alone.")
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return masked_mean((logits.squeeze(-1).float() - labels.float()).pow(2), mask, "sum")
        safe_labels = labels.masked_fill(~mask, 0).long()
        per_item = nn.functional.cross_entropy(logits.float(), safe_labels, reduction="none")
        return masked_mean(per_item, mask, "sum")

    def _record(self, components: dict[str, torch.Tensor], steps: int, training: bool) -> None:
        # Undo the accumulation scaling so each logged value reads as this micro-batch's mean loss.
        mode = "train" if training else "eval"
        for name, value in components.items():
            self._components[mode][name].append(float(value.detach()) * steps)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._components[mode].items():
            if values:
                mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                if self.accelerator.num_processes > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[f"{prefix}{name}"] = float(mean)
        self._components[mode].clear()
        super().log(logs, start_time)

    # --- checkpoints: projections travel with checkpoints (for resume), never with the student ----------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Projections first: Trainer writes trainer_state.json last, so a checkpoint that has it is complete.
        if self.matcher is not None and self.matcher.projections is not None and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.matcher.projections.state_dict().items()}
            safetensors.torch.save_file(state, os.path.join(folder, PROJECTIONS_FILE))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if self.matcher is not None and self.matcher.projections is not None and os.path.isfile(path):
            self.matcher.projections.load_state_dict(safetensors.torch.load_file(path))


class TeacherPrompt:
    """Puts a hand-written prompt in front of every teacher input (prompt/context distillation).

    The prompt goes after a leading special token ([CLS] / <bos>) when the tokenizer adds one. For causal LMs the
    teacher's logits at the prompt positions are dropped again, so that teacher position i predicts the same next
    token as student position i.
    """

    def __init__(self, text: str, tokenizer: Any) -> None:
        self.ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        probe = tokenizer("x")["input_ids"]
        self.insert_at = 1 if probe and probe[0] in set(tokenizer.all_special_ids) else 0
        self.length = int(self.ids.numel())

    def prepend(self, inputs: dict[str, Any]) -> dict[str, Any]:
        mask = inputs.get("attention_mask")
        if mask is not None and bool((mask[:, 0] == 0).any()):
            raise ValueError("teacher_prompt needs right-padded batches (the tokenizer's padding_side='right').")
        k, batch = self.insert_at, inputs["input_ids"].shape[0]
        fills = {"input_ids": self.ids.to(inputs["input_ids"].device), "attention_mask": 1, "token_type_ids": 0}
        # The student's position ids do not fit the longer teacher input: run_model derives the teacher's from
        # the prompted attention mask.
        result = {key: value for key, value in inputs.items() if key != "position_ids"}
        for key, fill in fills.items():
            if key not in inputs:
                continue
            tensor = inputs[key]
            middle = (
                fill.expand(batch, -1)
                if torch.is_tensor(fill)
                else torch.full((batch, self.length), fill, dtype=tensor.dtype, device=tensor.device)
            )
            result[key] = torch.cat([tensor[:, :k], middle, tensor[:, k:]], dim=1)
        return result

    def drop_prompt_positions(self, logits: torch.Tensor) -> torch.Tensor:
        """Teacher logits realigned to the student's positions (causal LM)."""
        k, length = self.insert_at, self.length
        if k == 0:
            return logits[:, length:]
        return torch.cat([logits[:, : k - 1], logits[:, k - 1 + length :]], dim=1)


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest checkpoint that was fully written (its trainer_state.json, written last, parses).

    transformers' get_last_checkpoint returns the newest folder even when a crash (SIGKILL, power loss) interrupted
    its writing; resuming from it then fails or restores a half-saved state.
    """
    import json
    import re

    if not os.path.isdir(folder):
        return None
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
    )
    for _, name in reversed(steps):
        try:
            with open(os.path.join(folder, name, "trainer_state.json")) as f:
                json.load(f)
            return os.path.join(folder, name)
        except (OSError, ValueError):
            continue
    return None


__all__ = ["DistillationTrainer", "last_complete_checkpoint"]
