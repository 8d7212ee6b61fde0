"""`DistillationTrainer`: a `transformers.Trainer` whose loss adds a frozen teacher's soft targets."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_distill.cache import CACHE_COLUMNS, CachedLogitsCollator, teacher_logits_from_cache
from hf_distill.cache_checks import validate_cached_dataset
from hf_distill.checkpoints import last_complete_checkpoint
from hf_distill.chunked_kd import chunked_distillation_loss, fused_hard_rows
from hf_distill.config import DistillationConfig
from hf_distill.forward import accepted_inputs, input_position_logits, run_model
from hf_distill.intermediate import IntermediateMatcher
from hf_distill.losses import MULTI_LABEL, SINGLE_LABEL, check_finite_kd, hard_label_loss
from hf_distill.normalisation import (
    POSITIONS,
    BatchCounts,
    LossTally,
    Term,
    example_counts,
    per_example,
    per_example_tokens,
    token_mask,
)
from hf_distill.preflight import resolve_problem_type, validate_loss_setup, validate_setup
from hf_distill.prompts import num_virtual_tokens
from hf_distill.tasks import Task, align_logits, infer_task, unwrap_model
from hf_distill.teacher import load_teacher
from hf_distill.teacher_logits import TeacherLogits, streamable_head, streamed_head
from hf_distill.teacher_prompt import TeacherPrompt
from hf_distill.vocabulary import text_tokenizer

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
        if kwargs.get("data_collator") is None and self.task is Task.CAUSAL_LM and hasattr(processing_class, "pad"):
            # Trainer's default collator pads input_ids but not per-token labels (tokenize_chat's rows would fail
            # at the first ragged batch); this one pads labels with -100 and is a no-op where there are none.
            kwargs["data_collator"] = DataCollatorForSeq2Seq(processing_class, padding=True, label_pad_token_id=-100)
        # Every check runs before Trainer builds optimizers, dataloaders or moves weights.
        train_dataset = kwargs.get("train_dataset")
        self.class_match = validate_setup(
            model,
            teacher,
            args,
            self.task,
            train_dataset,
            processing_class,
            eval_dataset=kwargs.get("eval_dataset"),
            data_collator=kwargs.get("data_collator"),
        )
        # multi-label heads distil per class (sigmoid) and train on BCE; regression heads on MSE.
        self.problem_type = resolve_problem_type(model, teacher, self.task, train_dataset)
        validate_loss_setup(model, args, self.task, self.problem_type, train_dataset, kwargs.get("compute_loss_func"))
        # Prompt-learning PEFT students prepend virtual positions to their outputs; they never meet a teacher token.
        self.num_virtual_tokens = num_virtual_tokens(model)
        self.teacher_prompt = (
            TeacherPrompt(args.teacher_prompt, processing_class, args.teacher_prompt_as)
            if args.teacher_prompt
            else None
        )
        self.matcher = IntermediateMatcher(model, teacher, args, self.task) if teacher is not None else None
        if self.matcher is not None and self.matcher.projections is not None:
            # A submodule of the student so that DDP syncs it and the optimizer trains it; excluded from every save.
            model.add_module(IntermediateMatcher.ATTRIBUTE, self.matcher.projections)
            model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or set()) | {
                f"{IntermediateMatcher.ATTRIBUTE}.{k}" for k in self.matcher.projections.state_dict()
            }
        super().__init__(model=model, args=args, **kwargs)
        self.data_collator = CachedLogitsCollator(self.data_collator)
        # get_batch_samples counts the positions of each accumulation step itself (Trainer's count uses unshifted
        # labels for models without a causal loss_type, and nothing without labels): Trainer need not count.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        self.tally = LossTally(self.accelerator)
        self.teacher = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if args.torch_teacher_dtype is not None:
                teacher.to(args.torch_teacher_dtype)
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.teacher_head = None  # set: the loss applies the teacher's LM head per chunk of positions
        if self.teacher is not None and self.task is Task.CAUSAL_LM:
            self.teacher_head = streamable_head(self.teacher, lambda b: run_model(self.teacher, b, use_cache=False))

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
                validate_cached_dataset(self.model, self.args, self.task, dataset, name, self._tokenizer_size())
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _tokenizer_size(self) -> int | None:
        tokenizer = text_tokenizer(self.processing_class)
        return len(tokenizer) if tokenizer is not None else None

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
        num_items_in_batch: BatchCounts | torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The weighted total of :meth:`_loss_terms` and :meth:`_layer_terms`, normalised by :meth:`_normalised_total`.

        In training ``num_items_in_batch`` is the :class:`BatchCounts` of :meth:`get_batch_samples`; any other value
        (Trainer's own count in evaluation) is not used.
        """
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
            teacher_outputs, teacher_logits = self._teacher_forward(inputs, extra)
        else:
            classes = self.class_match.teacher if self.class_match else student_logits.shape[-1]
            teacher_logits = teacher_logits_from_cache(cached, classes, self.args.temperature)

        terms = self._loss_terms(student_logits, teacher_logits, labels, inputs.get("attention_mask"), model.training)
        if teacher_outputs is not None and self.matcher is not None:
            terms |= self._layer_terms(outputs, teacher_outputs, inputs.get("attention_mask"))
        total = self._normalised_total(terms, num_items_in_batch if model.training else None)
        self.tally.record(terms, model.training)
        if not return_outputs:
            return total
        # prediction_step turns every output field into "predictions": hand it the logits alone, as plain Trainer does.
        return total, type(outputs)(loss=total.detach(), logits=student_logits)

    def _teacher_forward(self, inputs: dict[str, Any], extra: dict[str, Any]) -> tuple[Any, TeacherLogits]:
        """The teacher's output (without logits) and its logits on the student's positions, as a view read by chunks.

        A causal-LM teacher whose logits are its LM head applied to the last hidden state runs without its head
        (:func:`~hf_distill.teacher_logits.streamed_head`): the loss applies the head a chunk of positions at a
        time, so the teacher's ``[batch, seq, vocab]`` logits are never computed. ``teacher_top_k`` then keeps the
        top-k summary only.
        """
        if self.teacher.training:  # a teacher sharing a PEFT student's frozen base follows model.train()
            self.teacher.eval()
        teacher_inputs = self.teacher_prompt.prepend(inputs) if self.teacher_prompt else inputs
        head = self.teacher_head
        streaming = streamed_head(head) if head is not None else contextlib.nullcontext({})
        with torch.no_grad(), self.matcher.capture_values(self.teacher, "teacher"), streaming as captured:
            teacher_outputs = run_model(self.teacher, teacher_inputs, **extra)
        per_position = input_position_logits(self.teacher, captured["hidden"] if head else teacher_outputs.logits)
        if self.teacher_prompt is not None and self.task is Task.CAUSAL_LM:
            per_position = self.teacher_prompt.drop_prompt_positions(per_position)
        if head is not None:
            view = TeacherLogits.from_head(per_position, head, int(head.weight.shape[0]))
        else:
            view = TeacherLogits.dense(per_position)
        if self.args.teacher_top_k:
            compared = self.class_match.compared if self.class_match else None
            view = view.summarised(self.args.teacher_top_k, self.args.temperature, compared)
        teacher_outputs["logits"] = None  # the view holds what the loss reads
        return teacher_outputs, view

    def _loss_terms(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | TeacherLogits,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        training: bool,
    ) -> dict[str, Term]:
        """Per-example sums and counts of ``kd_loss`` and ``hard_loss`` over the loss positions."""
        args: DistillationConfig = self.args
        aligned = align_logits(self.task, student_logits, teacher_logits, labels, attention_mask)
        batch = student_logits.shape[0]
        # alpha applies per example: one without any label (-100) takes the soft loss alone, at weight 1.
        labelled_rows = aligned.labelled.reshape(batch, -1).any(1)
        terms: dict[str, Term] = {}
        hard = None
        if aligned.teacher is not None and (args.alpha > 0 or not bool(labelled_rows.all())):
            kd_weights = torch.where(labelled_rows, args.alpha, 1.0)
            fused = fused_hard_rows(aligned, kd_weights, args, self.hard_loss) if training else None
            kd = chunked_distillation_loss(
                aligned.student,
                aligned.teacher,
                aligned.mask,
                loss=args.kd_loss,
                temperature=args.temperature,
                scale_by_t2=args.scale_by_t2,
                multi_label=self.problem_type == MULTI_LABEL,
                chunk_size=args.kd_chunk_size,
                num_classes=self.class_match.compared if self.class_match else None,
                hard=fused,
                **args.kd_params(),
            )
            kd, hard = kd if fused is not None else (kd, None)
            terms["kd_loss"] = per_example(kd, aligned.mask, batch)
            terms["kd_loss"].weights = kd_weights.to(kd.dtype)
            if training:
                check_finite_kd(terms["kd_loss"].sums, args.kd_loss)
        if args.alpha < 1:
            hard = self.hard_loss(aligned.student, aligned.labels, aligned.labelled) if hard is None else hard
            terms["hard_loss"] = per_example(hard, aligned.labelled, batch)
        return terms

    def _layer_terms(self, outputs: Any, teacher_outputs: Any, attention_mask: torch.Tensor | None) -> dict[str, Term]:
        """Per-example sums and counts of the hidden-state and attention terms over the attention-mask tokens."""
        offset = self.num_virtual_tokens
        per_token = self.matcher.losses(outputs, teacher_outputs, attention_mask, student_offset=offset)
        return {name: per_example_tokens(v, token_mask(attention_mask, v)) for name, v in per_token.items()}

    def _normalised_total(self, terms: dict[str, Term], counts: BatchCounts | Any) -> torch.Tensor:
        """``Σ weight · (summed term) / (its positions or tokens)``.

        In training the counts span the whole accumulation step on all ranks (:meth:`get_batch_samples`), so that
        the summed micro-batch gradients, averaged by DDP over ranks, are those of one big batch. Elsewhere (eval, or
        a direct call) the batch alone is the normaliser.
        """
        total = torch.zeros((), device=self.args.device)
        # Label-level terms share one denominator, the positions of the soft loss (a superset of the hard loss's):
        # with unlabelled examples the loss is a per-example mean of alpha·KD + (1 − alpha)·CE or KD alone.
        positions = max((t.counts.sum() for t in terms.values() if t.unit == POSITIONS), default=None)
        for name, term in terms.items():
            if isinstance(counts, BatchCounts):
                denominator = counts.denominator(term.unit)
            else:
                denominator = (positions if term.unit == POSITIONS else term.counts.sum()).clamp_min(1)
            weighted = (
                term.sums.sum() * self.args.loss_weight(name)
                if term.weights is None
                else (term.weights * term.sums).sum()
            )
            total = total + weighted / denominator
        return total

    def hard_loss(self, logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Hard-label loss per loss position, ``[N]`` from ``logits [N, C]`` (override to change it).

        Cross-entropy with ``label_smoothing_factor`` for single-label heads, token classification and causal LM;
        BCE averaged over classes for multi-label heads; squared error for regression heads. Values at positions
        outside ``mask`` are ignored.
        """
        if labels is None:
            raise ValueError("alpha < 1 needs labels in every batch; set alpha=1.0 to train on the teacher alone.")
        if self.problem_type == SINGLE_LABEL:
            labels = labels.masked_fill(~mask, 0)  # -100 is not a class index
        return hard_label_loss(
            logits, labels, problem_type=self.problem_type, label_smoothing=self.args.label_smoothing_factor
        )

    # --- normalisation and logging -----------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and their :class:`BatchCounts`, summed over all ranks.

        Counted with the loss's own rules (shifted labels for every causal LM, attention mask without labels,
        tokens for layer terms), including a short last accumulation step.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        if self.args.lmbda > 0 or self.args.seq_kd:  # GKD: responses sampled before the positions are counted
            batch_samples = [self._policy_batch(batch) for batch in batch_samples]
        counts = torch.stack([example_counts(self.task, batch).to(device) for batch in batch_samples]).sum(0)
        ranks = 1
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            ranks = self.accelerator.num_processes
            counts = self.accelerator.gather(counts[None]).sum(0)
        return batch_samples, BatchCounts(positions=counts[0], tokens=counts[1], ranks=ranks)

    def _policy_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        from hf_distill.onpolicy import policy_batch

        if not hasattr(self, "_policy_rng"):
            self._policy_rng = random.Random(self.args.seed + self.accelerator.process_index)
        config = unwrap_model(self.model).config
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0)
        teacher = unwrap_model(self.teacher) if self.teacher is not None else None
        return policy_batch(
            batch,
            student=unwrap_model(self.model),
            teacher=teacher,
            args=self.args,
            tokenizer_ids=(pad, eos),
            rng=self._policy_rng,
        )

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Trainer's loop, plus every component and ``eval_loss`` as exact means over the whole set and all ranks.

        ``eval_loss`` is then the weighted sum of the logged components (Trainer's own is a mean of batch means,
        which for token-level tasks weighs a short sequence like a long one).
        """
        self.tally.reset_eval()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        prefix = metric_key_prefix
        means = self.tally.eval_means()
        if means:
            for name, value in means.items():
                output.metrics[f"{prefix}_{name}"] = value
            output.metrics[f"{prefix}_loss"] = sum(self.args.loss_weight(n) * v for n, v in means.items())
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the components' means over the same window, all ranks
            logs.update(self.tally.train_means())
        elif "train_loss" in logs:  # the end of train(): means over the whole run, next to Trainer's train_loss
            logs.update({f"train_{name}": value for name, value in self.tally.run_means().items()})
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


__all__ = ["DistillationTrainer", "last_complete_checkpoint"]
