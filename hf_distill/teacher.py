"""The teacher: loading a fine-tuned one (folder or Hub id) and fine-tuning a backbone on the task first."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hf_distill.config import DistillationConfig
from hf_distill.gguf import convert_gguf, is_gguf
from hf_distill.labels import labels_from_data
from hf_distill.loading import load_model
from hf_distill.tasks import Task

GGUF_CACHE = "gguf_teacher"  # under the run's output_dir: where a .gguf teacher's safetensors copy is kept


def load_teacher(path: str, args: DistillationConfig, task: Task) -> PreTrainedModel:
    """Load a fine-tuned teacher from a folder, a Hub id or a ``.gguf`` file, with the student's Auto class.

    safetensors only; no remote code unless ``teacher_model_init_kwargs`` asks for it; ``teacher_dtype`` applied.
    A ``.gguf`` file (causal LMs) is converted once to a safetensors folder under ``output_dir/gguf_teacher``
    (:func:`hf_distill.gguf.convert_gguf`).

    Raises:
        ValueError: ``path`` is a file that is not GGUF, a folder without a saved model, or a GGUF teacher for a
            student that is not a causal LM.
    """
    if is_gguf(path):
        if task is not Task.CAUSAL_LM:
            raise ValueError(f"A GGUF teacher is a causal LM; the student solves {task.value}.")
        path = str(convert_gguf(path, Path(args.output_dir) / GGUF_CACHE))
    kwargs: dict[str, Any] = dict(args.teacher_model_init_kwargs or {})
    if args.torch_teacher_dtype is not None:
        kwargs.setdefault("dtype", args.torch_teacher_dtype)
    model, _ = load_model(path, task, with_tokenizer=False, **kwargs)
    return model


def finetune_teacher(
    source: str,
    data: Any,
    tokenizer: Any,
    output: Path,
    *,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    id2label: dict[int, str] | None = None,
) -> None:
    """Fine-tune a backbone (e.g. MiniLM) for sequence classification with a plain ``Trainer``; saves to ``output``.

    ``data["train"]`` is tokenized with ``labels`` (class ids). ``id2label`` names the classes (e.g.
    ``LabelSet.id2label`` from :func:`hf_distill.labels.labels_from_data`); None: ``LABEL_<id>`` for ids
    ``0..max(labels)``. The head gets one output per class.

    Raises:
        ValueError: a label id without a class in ``id2label``, or ids that are not ``0..n-1`` (checked before the
            backbone loads).
    """
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    seen = sorted(set(data["train"]["labels"]))
    if id2label is None:
        id2label = labels_from_data(seen, seen).id2label
    unknown = [label for label in seen if label not in id2label]
    if unknown or sorted(id2label) != list(range(len(id2label))):
        raise ValueError(
            f"id2label {id2label} must name ids 0..n-1 and every training label (unnamed: {unknown}); pass the "
            "data's label set (hf_distill.labels.labels_from_data) as id2label."
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        # A saved head for another number of classes is replaced by a new one for these classes.
        ignore_mismatched_sizes=True,
        use_safetensors=True,
    )
    args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        warmup_steps=50,
        weight_decay=0.01,
        train_sampling_strategy="group_by_length",
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    trainer.save_model(str(output))
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
