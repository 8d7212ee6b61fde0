"""KD on unlabelled text: an example whose label is -100 takes the soft loss alone (alpha applies per example)."""

import datasets
import pytest
import torch
from conftest import VOCAB, minilm_tokenizer, text_model, tiny_bert
from test_normalisation import cfg, tiny_token_classifier
from torch.nn import functional as F
from transformers import DataCollatorWithPadding

from hf_distill import DistillationTrainer
from hf_distill.data import tokenize_text_classification
from hf_distill.losses import distillation_loss
from hf_distill.normalisation import example_counts
from hf_distill.tasks import Task

ALPHA, T = 0.3, 2.0


def _seq_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (4, 6), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([1, -100, 0, -100])}


def _by_hand_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return distillation_loss(student_logits, teacher_logits, loss="forward_kl", temperature=T, reduction="none")


def test_mixed_sequence_batch_weights_labelled_alpha_and_unlabelled_one(out_dir):
    student, teacher = tiny_bert(2, seed=1), tiny_bert(4, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=cfg(out_dir, alpha=ALPHA, temperature=T), train_dataset=None
    )
    batch = _seq_batch()
    loss = trainer.compute_loss(student.eval(), dict(batch))
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        s, t = student(**inputs).logits, teacher(**inputs).logits
        kd = _by_hand_kd(s, t)
        ce = F.cross_entropy(s[[0, 2]], batch["labels"][[0, 2]], reduction="none")
    # Rows 0 and 2: alpha·KD + (1 − alpha)·CE; rows 1 and 3: KD alone; mean over the 4 examples.
    expected = (ALPHA * (kd[0] + kd[2]) + kd[1] + kd[3] + (1 - ALPHA) * ce.sum()) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The logged components stay plain means: KD over all 4 examples, CE over the 2 labelled ones.
    means = trainer.tally.eval_means()
    assert means["kd_loss"] == pytest.approx(kd.mean().item(), rel=1e-5)
    assert means["hard_loss"] == pytest.approx(ce.mean().item(), rel=1e-5)
    # The accumulated-batch count the training normaliser uses covers every example.
    assert example_counts(Task.SEQUENCE_CLASSIFICATION, batch)[0].item() == 4


def test_only_unlabelled_batch_is_pure_kd_and_all_labelled_is_unchanged(out_dir):
    student, teacher = tiny_bert(2, seed=1), tiny_bert(4, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=cfg(out_dir, alpha=ALPHA, temperature=T), train_dataset=None
    )
    batch = _seq_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t = student.eval()(**inputs).logits, teacher(**inputs).logits
    kd = _by_hand_kd(s, t)
    none = trainer.compute_loss(student, {**inputs, "labels": torch.full((4,), -100)})
    assert none.item() == pytest.approx(kd.mean().item(), rel=1e-5)
    labels = torch.tensor([1, 0, 0, 1])
    every = trainer.compute_loss(student, {**inputs, "labels": labels})
    expected = ALPHA * kd.mean() + (1 - ALPHA) * F.cross_entropy(s, labels)
    assert every.item() == pytest.approx(expected.item(), rel=1e-5)


def test_unlabelled_token_row_distils_every_attended_token(out_dir):
    student, teacher = tiny_token_classifier(1), tiny_token_classifier(2)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=cfg(out_dir, alpha=ALPHA, temperature=T), train_dataset=None
    )
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 5), generator=g)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, 2, 1, -100, 0], [-100, -100, -100, -100, -100]])
    loss = trainer.compute_loss(
        student.eval(), {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    )
    with torch.no_grad():
        s = student(input_ids=input_ids, attention_mask=attention_mask).logits
        t = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    kd = _by_hand_kd(s.reshape(-1, 3), t.reshape(-1, 3)).reshape(2, 5)
    ce = F.cross_entropy(s[0, [1, 2, 4]], labels[0, [1, 2, 4]], reduction="sum")
    # Row 0: its 3 labelled tokens (alpha·KD + (1 − alpha)·CE); row 1: its 3 attended tokens, KD alone.
    expected = (ALPHA * kd[0, [1, 2, 4]].sum() + kd[1, :3].sum() + (1 - ALPHA) * ce) / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_unlabelled_rows_train_through_the_trainer(out_dir):
    """A dataset of labelled rows plus unlabelled text (labels -100) trains, logging both components."""
    tokenizer = minilm_tokenizer()
    labelled = datasets.DatasetDict(train=datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]}))
    text = datasets.DatasetDict(train=datasets.Dataset.from_dict({"sentence": ["a film", "another one", "more"]}))
    labelled = tokenize_text_classification(tokenizer, labelled, "sentence", "label", max_length=16)["train"]
    text = tokenize_text_classification(tokenizer, text, "sentence", None, max_length=16)["train"]
    assert text["labels"] == [-100, -100, -100] and labelled["labels"] == [1, 0]
    mixed = datasets.concatenate_datasets([labelled, text])
    student, teacher = text_model(layers=1, seed=1), text_model(layers=2, seed=2)
    args = cfg(out_dir, alpha=ALPHA, temperature=T, per_device_train_batch_size=5, num_train_epochs=1)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=mixed.remove_columns("length"),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    logged = trainer.state.log_history[-1]
    assert logged["train_kd_loss"] > 0 and logged["train_hard_loss"] > 0
