"""DistillationTrainer end to end on tiny models: frozen teacher, KD gain, accumulation, logging, saving."""

import json

import pytest
import torch
from conftest import first_token_rule, lm_dataset, tiny_bert, tiny_llama
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForTokenClassification,
    Trainer,
    TrainingArguments,
)

from hf_distill import DistillationConfig, DistillationTrainer, classification_metrics, create_student
from hf_distill.cache import pad_batch
from hf_distill.intermediate import IntermediateMatcher


def cfg(out_dir, **overrides):
    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=16,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=3e-3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return DistillationConfig(**base)


def accuracy(model, dataset, out_dir):
    args = TrainingArguments(output_dir=out_dir, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(
        model=model, args=args, eval_dataset=dataset, data_collator=pad_batch, compute_metrics=classification_metrics
    )
    return trainer.evaluate()["eval_accuracy"]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """A teacher that learned the clean rule (first token in the upper half of the vocabulary)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    teacher = tiny_bert(2, seed=1)
    DistillationTrainer(
        model=teacher,
        teacher=tiny_bert(2, seed=5),
        args=cfg(out, alpha=0.0, num_train_epochs=3),
        train_dataset=first_token_rule(1500, 0),
        data_collator=pad_batch,
    ).train()
    assert accuracy(teacher, first_token_rule(400, 99), out) > 0.97
    return teacher


def test_kd_student_beats_label_only_student_when_labels_are_noisy(trained_teacher, out_dir):
    noisy = first_token_rule(120, 1, flip=0.35)  # labels hide the rule the teacher knows
    clean_test = first_token_rule(400, 99)
    scores = {}
    for alpha in (0.0, 0.9):
        student = tiny_bert(1, seed=3)
        DistillationTrainer(
            model=student,
            teacher=trained_teacher,
            args=cfg(out_dir, alpha=alpha, num_train_epochs=15),
            train_dataset=noisy,
            data_collator=pad_batch,
        ).train()
        scores[alpha] = accuracy(student, clean_test, out_dir)
    assert scores[0.9] >= scores[0.0] + 0.15, scores


def test_teacher_stays_frozen_and_only_student_changes(trained_teacher, out_dir):
    teacher_before = {k: v.clone() for k, v in trained_teacher.state_dict().items()}
    student = create_student(trained_teacher, num_layers=1)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student,
        teacher=trained_teacher,
        args=cfg(out_dir, max_steps=5, hidden_loss_weight=1.0),
        train_dataset=first_token_rule(80, 2),
        data_collator=pad_batch,
    )
    trainer.train()
    for key, value in trained_teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not trained_teacher.training
    assert all(not p.requires_grad for p in trained_teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trained_teacher.parameters()}
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def _lm_update(out_dir, batch, accumulation):
    student = tiny_llama(num_layers=2, seed=4)
    teacher = tiny_llama(num_layers=4, seed=7)
    data = lm_dataset(8, 3, seq_len=12)
    # Ragged lengths and masked prompts: micro-batches hold different numbers of loss positions.
    data = data.map(
        lambda ex, i: {
            "input_ids": ex["input_ids"][: 4 + i],
            "attention_mask": ex["attention_mask"][: 4 + i],
            "labels": [-100] * (i % 3) + ex["labels"][i % 3 : 4 + i],
        },
        with_indices=True,
    )
    args = cfg(
        out_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        alpha=0.5,
        temperature=2.0,
        max_grad_norm=0.0,
    )
    DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data, data_collator=pad_batch).train()
    return student.state_dict()


def test_gradient_accumulation_gives_the_same_update(out_dir):
    one = _lm_update(out_dir, batch=8, accumulation=1)
    two = _lm_update(out_dir, batch=4, accumulation=2)
    start = tiny_llama(num_layers=2, seed=4).state_dict()
    assert any(not torch.allclose(one[k], start[k]) for k in one)
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-4)


def test_components_are_logged_for_train_and_eval(trained_teacher, out_dir):
    data = first_token_rule(64, 4)
    args = cfg(
        out_dir,
        max_steps=4,
        logging_steps=2,
        logging_strategy="steps",
        eval_strategy="steps",
        eval_steps=4,
        hidden_loss_weight=0.5,
        attention_loss_weight=0.5,
    )
    trainer = DistillationTrainer(
        model=create_student(trained_teacher, num_layers=1),
        teacher=trained_teacher,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=pad_batch,
        compute_metrics=classification_metrics,
    )
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    for name in ("kd_loss", "hard_loss", "hidden_loss", "attention_loss"):
        assert name in train_logs[0] and f"eval_{name}" in eval_logs[0], name
    log = eval_logs[0]
    expected = (
        0.5 * log["eval_kd_loss"]
        + 0.5 * log["eval_hard_loss"]
        + 0.5 * log["eval_hidden_loss"]
        + 0.5 * log["eval_attention_loss"]
    )
    assert log["eval_loss"] == pytest.approx(expected, rel=1e-4)
    predictions = trainer.predict(data)
    assert predictions.predictions.shape == (64, 2)
    assert "test_accuracy" in predictions.metrics


def test_projection_trains_but_is_never_saved(out_dir):
    teacher = tiny_bert(2, hidden=48, seed=1)
    student = tiny_bert(2, hidden=32, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, max_steps=3, hidden_loss_weight=1.0, hidden_loss="cosine"),
        train_dataset=first_token_rule(48, 5),
        data_collator=pad_batch,
    )
    projection = getattr(student, IntermediateMatcher.ATTRIBUTE)
    before = {k: v.clone() for k, v in projection.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in projection.state_dict().items())
    trainer.save_model(out_dir + "/final")
    loaded = AutoModelForSequenceClassification.from_pretrained(out_dir + "/final")
    assert not hasattr(loaded, IntermediateMatcher.ATTRIBUTE)
    from safetensors import safe_open

    with safe_open(out_dir + "/final/model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if IntermediateMatcher.ATTRIBUTE in k]
    ids = torch.randint(3, 20, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_value_relation_attention_loss_trains(trained_teacher, out_dir):
    trainer = DistillationTrainer(
        model=create_student(trained_teacher, num_layers=1),
        teacher=trained_teacher,
        args=cfg(
            out_dir,
            max_steps=2,
            attention_loss_weight=1.0,
            alpha=1.0,
            attention_loss="value_relation",
            logging_steps=1,
            logging_strategy="steps",
        ),
        train_dataset=first_token_rule(32, 6),
        data_collator=pad_batch,
    )
    trainer.train()
    assert trainer.state.log_history[0]["attention_loss"] >= 0


def test_token_classification_ignores_minus_100(out_dir):
    config = BertConfig(
        vocab_size=24,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    teacher, student = BertForTokenClassification(config), BertForTokenClassification(config)
    data = first_token_rule(16, 7).map(lambda ex: {"labels": [-100] + [t % 3 for t in ex["input_ids"][1:]]})
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, max_steps=1, alpha=0.3),
        train_dataset=data,
        data_collator=pad_batch,
    )
    batch = pad_batch([data[i] for i in range(4)])
    loss = trainer.compute_loss(student.eval(), dict(batch))
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"] != -100
    ce = torch.nn.functional.cross_entropy(s_logits[keep], batch["labels"][keep])
    kl = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s_logits[keep] / 2, -1),
            torch.log_softmax(t_logits[keep] / 2, -1),
            log_target=True,
            reduction="batchmean",
        )
        * 4
    )
    assert loss.item() == pytest.approx((0.3 * kl + 0.7 * ce).item(), rel=1e-4)
    trainer.train()


def test_causal_lm_shifts_and_masks_prompt(out_dir):
    teacher, student = tiny_llama(4, seed=1), tiny_llama(2, seed=2)
    data = lm_dataset(8, 8).map(lambda ex: {"labels": [-100] * 5 + ex["labels"][5:]})
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, alpha=1.0, temperature=1.0, max_steps=1),
        train_dataset=data,
        data_collator=pad_batch,
    )
    batch = pad_batch([data[i] for i in range(3)])
    loss = trainer.compute_loss(student.eval(), dict(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits[:, 4:-1]  # position i predicts token i + 1
        t = teacher(input_ids=batch["input_ids"]).logits[:, 4:-1]
    manual = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-4)


def test_bf16_teacher_with_fp32_student(trained_teacher, out_dir):
    import copy

    teacher = copy.deepcopy(trained_teacher)
    trainer = DistillationTrainer(
        model=create_student(teacher, num_layers=1),
        teacher=teacher,
        args=cfg(out_dir, max_steps=2, teacher_dtype="bfloat16"),
        train_dataset=first_token_rule(32, 9),
        data_collator=pad_batch,
    )
    trainer.train()
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_teacher_loaded_from_path(trained_teacher, out_dir, tmp_path):
    trained_teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=tiny_bert(1),
        teacher=str(tmp_path / "teacher"),
        args=cfg(out_dir, max_steps=1),
        train_dataset=first_token_rule(16, 9),
        data_collator=pad_batch,
    )
    for name, param in trainer.teacher.state_dict().items():
        assert torch.equal(param, trained_teacher.state_dict()[name])


def test_resume_skips_a_half_written_checkpoint(tmp_path):
    from hf_distill.checkpoints import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-11").mkdir()
    (tmp_path / "checkpoint-11" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
