"""Offline distillation from cached teacher logits."""

import datasets
import pytest
import torch
from conftest import first_token_rule, lm_dataset, tiny_bert, tiny_llama

from hf_distill import DistillationConfig, DistillationTrainer, cache_teacher_logits
from hf_distill.cache import CachedLogitsCollator, dense_teacher_logits, pad_batch


def cfg(out_dir, **overrides):
    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
        max_steps=3,
        alpha=0.7,
        temperature=2.0,
    )
    base.update(overrides)
    return DistillationConfig(**base)


def _train(out_dir, teacher, data, model_fn, **overrides):
    student = model_fn()
    DistillationTrainer(
        model=student, teacher=teacher, args=cfg(out_dir, **overrides), train_dataset=data, data_collator=pad_batch
    ).train()
    return student.state_dict()


def test_full_cache_equals_online_teacher_classification(out_dir, tmp_path):
    teacher = tiny_bert(2, seed=1)
    data = first_token_rule(24, 0)
    cached = cache_teacher_logits(teacher, data, top_k=None, batch_size=5, save_path=str(tmp_path / "cache"))
    reloaded = datasets.load_from_disk(str(tmp_path / "cache"))
    assert reloaded.column_names == cached.column_names
    online = _train(out_dir, teacher, data, lambda: tiny_bert(1, seed=2))
    offline = _train(out_dir, None, reloaded, lambda: tiny_bert(1, seed=2))
    for key in online:
        torch.testing.assert_close(online[key], offline[key], atol=1e-6, rtol=1e-5)


def test_full_cache_equals_online_teacher_causal_lm_with_padding(out_dir):
    teacher = tiny_llama(3, seed=1)
    data = lm_dataset(12, 1).map(
        lambda ex, i: {k: ex[k][: 6 + i % 5] for k in ("input_ids", "attention_mask", "labels")}, with_indices=True
    )
    cached = cache_teacher_logits(teacher, data, top_k=None, batch_size=4)
    # Per token, not per padded position: row i keeps exactly its own length.
    assert [len(r) for r in cached["teacher_topk_logits"]] == [len(r) for r in data["input_ids"]]
    trainer_online = DistillationTrainer(
        model=tiny_llama(2, seed=2), teacher=teacher, args=cfg(out_dir), train_dataset=data, data_collator=pad_batch
    )
    trainer_offline = DistillationTrainer(
        model=tiny_llama(2, seed=2), args=cfg(out_dir), train_dataset=cached, data_collator=pad_batch
    )
    features = [cached[i] for i in range(5)]
    batch_offline = trainer_offline.data_collator([dict(f) for f in features])
    batch_online = pad_batch([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features])
    loss_online = trainer_online.compute_loss(trainer_online.model, dict(batch_online))
    loss_offline = trainer_offline.compute_loss(trainer_offline.model, dict(batch_offline))
    assert loss_offline.item() == pytest.approx(loss_online.item(), rel=1e-5)


def test_topk_cache_approximates_and_trains(out_dir):
    teacher = tiny_llama(3, seed=1)
    data = lm_dataset(8, 2)
    cached = cache_teacher_logits(teacher, data, top_k=5, temperature=2.0)
    row = cached[0]
    assert len(row["teacher_topk_logits"][0]) == 5 and 0 < row["teacher_rest_mass"][0] < 1
    batch = CachedLogitsCollator(pad_batch)([dict(cached[i]) for i in range(2)])
    dense = dense_teacher_logits(
        batch["teacher_topk_logits"],
        batch["teacher_topk_indices"],
        batch["teacher_rest_mass"],
        teacher.config.vocab_size,
        2.0,
    )
    probs = torch.softmax(dense / 2.0, -1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    with torch.no_grad():
        true = torch.softmax(teacher(input_ids=batch["input_ids"]).logits / 2.0, -1)
    top = batch["teacher_topk_indices"]
    torch.testing.assert_close(probs.gather(-1, top), true.gather(-1, top), atol=1e-5, rtol=1e-4)
    before = tiny_llama(2, seed=3).state_dict()
    after = _train(out_dir, None, cached, lambda: tiny_llama(2, seed=3))
    assert any(not torch.equal(after[k], before[k]) for k in after)


def test_left_padding_lines_up_with_cache():
    teacher = tiny_llama(2, seed=1)
    data = lm_dataset(4, 3).map(
        lambda ex, i: {k: ex[k][: 5 + i] for k in ("input_ids", "attention_mask", "labels")}, with_indices=True
    )
    cached = cache_teacher_logits(teacher, data, top_k=None)

    def left_pad(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = [width - len(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor([[0] * p + f["input_ids"] for p, f in zip(pad, features, strict=True)]),
            "attention_mask": torch.tensor(
                [[0] * p + list(f["attention_mask"]) for p, f in zip(pad, features, strict=True)]
            ),
        }

    batch = CachedLogitsCollator(left_pad)([dict(cached[i]) for i in range(4)])
    row = 0  # the shortest row: 3 pad positions on the left
    assert torch.equal(batch["teacher_topk_logits"][row, 3:], torch.tensor(cached[0]["teacher_topk_logits"]))


def test_cache_errors():
    teacher = tiny_bert(1)
    with pytest.raises(ValueError, match="must be tokenized"):
        cache_teacher_logits(teacher, datasets.Dataset.from_dict({"sentence": ["a"]}))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 2\]"):
        cache_teacher_logits(teacher, first_token_rule(4, 0), top_k=3)
