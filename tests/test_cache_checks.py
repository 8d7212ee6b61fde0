"""The offline cache is checked like the online teacher: class count, indices, temperatures, eval sets."""

import logging

import datasets
import pytest
import torch
from conftest import VOCAB, distill_args, first_token_rule, lm_dataset, tiny_bert, tiny_llama

from hf_distill import DistillationTrainer, cache_teacher_logits
from hf_distill.cache import CACHE_NUM_CLASSES, CachedLogitsCollator, pad_batch, teacher_logits_from_cache

cfg = distill_args


def offline(out_dir, student, train, eval_dataset=None, **overrides):
    return DistillationTrainer(
        model=student,
        args=cfg(out_dir, **overrides),
        train_dataset=train,
        eval_dataset=eval_dataset,
        data_collator=pad_batch,
    )


# --- case 4: the teacher's class count -------------------------------------------------------------------------

MODELS = {
    "sequence-classification": (lambda n, seed: tiny_bert(1, num_labels=n, seed=seed), lambda: first_token_rule(12, 0)),
    "causal-lm": (lambda n, seed: tiny_llama(1, vocab=n, seed=seed), lambda: lm_dataset(6, 0)),
}
MESSAGES = {
    "sequence-classification": "Teacher has {t} labels but the student {s}",
    "causal-lm": "Teacher vocabulary size {t} differs from the student's {s}",
}


@pytest.mark.parametrize("task", list(MODELS))
@pytest.mark.parametrize(("teacher_classes", "student_classes"), [(32, 40), (40, 32)])
def test_cache_from_a_teacher_with_other_classes_is_refused(out_dir, tmp_path, task, teacher_classes, student_classes):
    build, data = MODELS[task]
    cache_teacher_logits(build(teacher_classes, 1), data(), top_k=8, temperature=2.0, save_path=str(tmp_path / "cache"))
    cached = datasets.load_from_disk(str(tmp_path / "cache"))  # the count survives save_to_disk / load_from_disk
    assert set(cached[CACHE_NUM_CLASSES]) == {teacher_classes}
    message = MESSAGES[task].format(t=teacher_classes, s=student_classes)
    with pytest.raises(ValueError, match=message):
        offline(out_dir, build(student_classes, 2), cached)


@pytest.mark.parametrize("task", list(MODELS))
def test_cache_without_class_count_still_loads_and_indices_are_checked(out_dir, task, caplog):
    build, data = MODELS[task]
    wide = cache_teacher_logits(build(40, 1), data(), top_k=8, temperature=2.0).remove_columns(CACHE_NUM_CLASSES)
    with pytest.raises(ValueError, match=r"class indices up to 3[2-9] \(8 per position\) .* only 32 classes"):
        offline(out_dir, build(32, 2), wide)
    narrow = cache_teacher_logits(build(VOCAB, 1), data(), top_k=4, temperature=2.0).remove_columns(CACHE_NUM_CLASSES)
    with caplog.at_level(logging.WARNING, logger="hf_distill.cache_checks"):
        trainer = offline(out_dir, build(VOCAB, 2), narrow)
    assert "older hf_distill" in caplog.text
    trainer.train()  # an old cache that fits trains as before
    assert trainer.state.global_step == 1


def test_batch_with_indices_beyond_the_student_is_a_clear_error():
    cached = {
        "teacher_topk_logits": torch.zeros(2, 3),
        "teacher_topk_indices": torch.tensor([[0, 1, 2], [0, 1, 35]]),
        "teacher_rest_mass": torch.zeros(2),
        "teacher_temperature": torch.tensor([2.0, 2.0]),
    }
    with pytest.raises(ValueError, match="another label set or vocabulary"):
        teacher_logits_from_cache(cached, 32, 2.0)


# --- case 5: temperatures and eval sets ------------------------------------------------------------------------


def partial_cache(temperature, n=8, seed=0):
    """A top-2 cache of a 5-class teacher: leftover mass > 0, so its temperature matters."""
    return cache_teacher_logits(
        tiny_bert(1, num_labels=5, seed=1), first_token_rule(n, seed), top_k=2, temperature=temperature
    )


def test_train_cache_with_mixed_temperatures_is_refused(out_dir):
    mixed = datasets.concatenate_datasets([partial_cache(2.0), partial_cache(1.0, seed=1)])  # row 0 at T=2
    with pytest.raises(
        ValueError, match=r"train dataset holds top-2 teacher caches built at temperatures \[1.0, 2.0\]"
    ):
        offline(out_dir, tiny_bert(1, num_labels=5), mixed)


def test_batch_with_mixed_temperatures_is_refused(out_dir):
    good = partial_cache(2.0)
    trainer = offline(out_dir, tiny_bert(1, num_labels=5), good)
    rows = [dict(good[0]), dict(partial_cache(1.0, seed=1)[0])]
    batch = CachedLogitsCollator(pad_batch)(rows)
    with pytest.raises(ValueError, match=r"temperature\(s\) \[1.0, 2.0\] .* training uses temperature=2.0"):
        trainer.compute_loss(trainer.model, batch)


def test_eval_cache_at_another_temperature_is_refused(out_dir):
    student = tiny_bert(1, num_labels=5)
    with pytest.raises(ValueError, match=r"eval dataset's teacher cache was built at temperature 1.0"):
        offline(out_dir, student, partial_cache(2.0), eval_dataset=partial_cache(1.0))
    with pytest.raises(ValueError, match=r"eval dataset 'b'.* built at temperature 1.0"):
        offline(out_dir, student, partial_cache(2.0), eval_dataset={"a": partial_cache(2.0), "b": partial_cache(1.0)})
    trainer = offline(out_dir, student, partial_cache(2.0), eval_dataset=partial_cache(2.0))
    assert trainer.evaluate()["eval_kd_loss"] > 0
    with pytest.raises(ValueError, match=r"eval dataset's teacher cache was built at temperature 1.0"):
        trainer.evaluate(eval_dataset=partial_cache(1.0))


def test_eval_set_without_cache_is_refused_at_construction(out_dir):
    student = tiny_bert(1, num_labels=5)
    plain = first_token_rule(8, 3)
    with pytest.raises(ValueError, match="teacher=None needs an eval dataset with cached teacher logits"):
        offline(out_dir, student, partial_cache(2.0), eval_dataset=plain)
    with pytest.raises(ValueError, match="teacher=None needs an eval dataset 'test' with cached teacher logits"):
        offline(out_dir, student, partial_cache(2.0), eval_dataset={"dev": partial_cache(2.0), "test": plain})
    trainer = offline(out_dir, student, partial_cache(2.0))
    with pytest.raises(ValueError, match="this batch has no cached teacher logits"):
        trainer.predict(plain)  # labels but no cache: a clear error, not a KeyError
    assert trainer.predict(plain.remove_columns("labels")).predictions.shape == (8, 5)  # no labels: student only
