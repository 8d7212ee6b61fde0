"""What the loss means for each head: Trainer's loss options, multi-label and regression heads, teachers that give
probability 0. Either the loss is the one asked for, or a ValueError says why before training."""

import datasets
import pytest
import torch
from conftest import first_token_rule, tiny_bert
from test_normalisation import _lm_data, tiny_gpt2, tiny_token_classifier
from transformers import Trainer, TrainingArguments

from hf_distill import DistillationConfig, DistillationTrainer, cache_teacher_logits
from hf_distill.cache import pad_batch


def cfg(out_dir, **overrides):
    base = dict(output_dir=out_dir, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(overrides)
    return DistillationConfig(**base)


def _batch(data):
    return pad_batch([data[i] for i in range(len(data))])


def _distil_loss(out_dir, student, teacher, data, **overrides):
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=cfg(out_dir, **overrides), train_dataset=data, data_collator=pad_batch
    )
    batch = trainer.data_collator([data[i] for i in range(len(data))])  # with the cached teacher columns, if any
    return trainer.compute_loss(student.eval(), batch).item()


# --- case 5: Trainer's loss options --------------------------------------------------------------------------------


def _three_classes(example):
    return {"labels": example["input_ids"][0] % 3}


def _sharpened(model, factor=20.0):
    """Random tiny models predict nearly uniformly, where smoothing hardly matters; scaled up, they are confident."""
    head = model.classifier.weight if hasattr(model, "classifier") else model.transformer.ln_f.weight
    with torch.no_grad():
        head.mul_(factor)
    return model


LABELLED = {
    "sequence": (
        lambda s: _sharpened(tiny_bert(2, seed=s, num_labels=3)),
        lambda: first_token_rule(6, 2).map(_three_classes),
    ),
    "token": (
        lambda s: _sharpened(tiny_token_classifier(s)),
        lambda: first_token_rule(4, 7).map(lambda ex: {"labels": [-100] + [t % 3 for t in ex["input_ids"][1:]]}),
    ),
    "causal_lm": (lambda s: _sharpened(tiny_gpt2(s)), lambda: _lm_data(50, (5, 6, 8), masked=1)),
}


@pytest.mark.parametrize("task", sorted(LABELLED))
def test_label_smoothing_is_trainers_smoothed_cross_entropy(task, out_dir):
    make, make_data = LABELLED[task]
    student, data = make(1), make_data()
    plain = Trainer(model=student, args=TrainingArguments(out_dir, label_smoothing_factor=0.1, report_to=[]))
    expected = plain.compute_loss(student.eval(), dict(_batch(data))).item()
    got = _distil_loss(out_dir, student, make(2), data, alpha=0.0, label_smoothing_factor=0.1)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(_distil_loss(out_dir, student, make(2), data, alpha=0.0) - expected) > 1e-3  # smoothing matters


@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        (
            {},
            {"compute_loss_func": lambda outputs, labels, num_items_in_batch: 0},
            "compute_loss_func would be ignored",
        ),
        ({"alpha": 1.0, "label_smoothing_factor": 0.1}, {}, "alpha=1.0 switches off"),
        ({"label_names": ["my_labels"]}, {}, "reads the labels from the 'labels' field"),
        ({"use_liger_kernel": True}, {}, "Set use_liger_kernel=False"),
    ],
)
def test_trainer_options_the_loss_would_ignore_are_rejected(out_dir, overrides, extra, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(
            model=tiny_bert(1),
            teacher=tiny_bert(2),
            args=cfg(out_dir, **overrides),
            train_dataset=first_token_rule(4, 0),
            data_collator=pad_batch,
            **extra,
        )


# --- case 6: multi-label heads -------------------------------------------------------------------------------------

MULTI = "multi_label_classification"


def _multi_hot(n=6, classes=3, seed=0):
    data = first_token_rule(n, seed)
    g = torch.Generator().manual_seed(seed)
    hot = (torch.rand(n, classes, generator=g) > 0.5).float().tolist()
    return data.remove_columns("labels").add_column("labels", hot)


def _multi_label_bert(seed, problem_type=MULTI, **kwargs):
    model = tiny_bert(2, seed=seed, num_labels=3, problem_type=problem_type, **kwargs)
    with torch.no_grad():
        model.classifier.weight.mul_(20)  # O(1) logits: KD values that are not float noise
    return model


def test_multi_label_hard_loss_is_the_heads_own_bce(out_dir):
    student, data = _multi_label_bert(1), _multi_hot()
    batch = _batch(data)
    with torch.no_grad():
        expected = student.eval()(**batch).loss.item()  # transformers' BCEWithLogitsLoss
    assert _distil_loss(out_dir, student, _multi_label_bert(2), data, alpha=0.0) == pytest.approx(expected, rel=1e-5)
    # Without a declared problem_type, multi-hot labels decide it, as in transformers' heads.
    undeclared = _multi_label_bert(1, problem_type=None)
    got = _distil_loss(out_dir, undeclared, _multi_label_bert(2, problem_type=None), data, alpha=0.0)
    assert got == pytest.approx(expected, rel=1e-5)


def test_multi_label_kd_is_per_class_binary_and_trains(out_dir):
    student, teacher, data = _multi_label_bert(1), _multi_label_bert(2), _multi_hot()
    batch = _batch(data)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ps, pt = torch.sigmoid(student.eval()(**inputs).logits / 2), torch.sigmoid(teacher(**inputs).logits / 2)
    bernoulli = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    expected = float(bernoulli.mean()) * 4
    assert _distil_loss(out_dir, student, teacher, data, alpha=1.0, temperature=2.0) == pytest.approx(
        expected, rel=1e-4
    )
    args = cfg(out_dir, alpha=0.5, max_steps=2, per_device_train_batch_size=3, logging_steps=1)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=data, eval_dataset=data, data_collator=pad_batch
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert metrics["eval_loss"] == pytest.approx(0.5 * metrics["eval_kd_loss"] + 0.5 * metrics["eval_hard_loss"])


def test_multi_label_setups_that_cannot_work_are_rejected(out_dir):
    data = _multi_hot()
    with pytest.raises(ValueError, match="both heads must read their outputs the same way"):
        single = tiny_bert(2, num_labels=3, problem_type="single_label_classification")
        DistillationTrainer(model=_multi_label_bert(1), teacher=single, args=cfg(out_dir))
    with pytest.raises(ValueError, match="multi-hot list of num_labels floats"):
        DistillationTrainer(
            model=_multi_label_bert(1),
            teacher=_multi_label_bert(2),
            args=cfg(out_dir),
            train_dataset=first_token_rule(4, 0),
        )
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 smooths a softmax"):
        DistillationTrainer(
            model=_multi_label_bert(1),
            teacher=_multi_label_bert(2),
            args=cfg(out_dir, label_smoothing_factor=0.1),
            train_dataset=data,
        )
    partial = cache_teacher_logits(_multi_label_bert(2), data, top_k=2)
    with pytest.raises(ValueError, match="needs every class's logit"):
        args = cfg(out_dir, temperature=1.0)
        DistillationTrainer(model=_multi_label_bert(1), teacher=None, args=args, train_dataset=partial)


def test_multi_label_full_cache_equals_online_teacher(out_dir):
    teacher, data = _multi_label_bert(2), _multi_hot()
    cached = cache_teacher_logits(teacher, data, top_k=None)
    online = _distil_loss(out_dir, _multi_label_bert(1), teacher, data, alpha=0.6)
    offline = _distil_loss(out_dir, _multi_label_bert(1), None, cached, alpha=0.6)
    assert offline == pytest.approx(online, rel=1e-5)


# --- case 7: regression heads --------------------------------------------------------------------------------------


def _regressor(seed, shift=0.0, **kwargs):
    model = tiny_bert(2, seed=seed, num_labels=1, **kwargs)
    with torch.no_grad():
        model.classifier.bias.add_(shift)
    return model


def _scores(n=6):
    data = first_token_rule(n, 4)
    return data.remove_columns("labels").add_column("labels", [float(i) / n for i in range(n)])


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_distribution_kd_on_a_regression_head_is_rejected(kd_loss, out_dir):
    with pytest.raises(ValueError, match="Use kd_loss='mse'"):
        DistillationTrainer(
            model=_regressor(1), teacher=_regressor(2, 4.0), args=cfg(out_dir, kd_loss=kd_loss), train_dataset=_scores()
        )
    two_outputs = dict(num_labels=2, problem_type="regression")
    with pytest.raises(ValueError, match="Use kd_loss='mse'"):
        DistillationTrainer(
            model=tiny_bert(1, **two_outputs), teacher=tiny_bert(2, **two_outputs), args=cfg(out_dir, kd_loss=kd_loss)
        )


def test_regression_distils_with_mse(out_dir):
    student, teacher, data = _regressor(1), _regressor(2, 4.0), _scores()
    batch = _batch(data)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = student.eval()(**inputs).logits, teacher(**inputs).logits
        hard = student(**batch).loss.item()  # transformers' MSELoss
    assert float((t - s).abs().mean()) == pytest.approx(4.0, abs=0.5)
    got = _distil_loss(out_dir, student, teacher, data, kd_loss="mse", alpha=0.25)
    assert got == pytest.approx(0.25 * float(((s - t) ** 2).mean()) + 0.75 * hard, rel=1e-5)
    # alpha=0 switches KD off: the default divergence is then harmless.
    assert _distil_loss(out_dir, student, teacher, data, alpha=0.0) == pytest.approx(hard, rel=1e-5)


# --- case 3 in training: a teacher that gives probability 0 ---------------------------------------------------------


def _masking_teacher(seed=2):
    teacher = tiny_bert(2, seed=seed, num_labels=3)
    with torch.no_grad():
        teacher.classifier.bias[2] = float("-inf")  # class 2 never happens
    return teacher


def _three_class_data():
    return first_token_rule(8, 6).map(_three_classes)


def test_teacher_with_zero_probability_trains_online_and_cached(out_dir):
    teacher, data = _masking_teacher(), _three_class_data()
    states = []
    for source, train_data in ((teacher, data), (None, cache_teacher_logits(teacher, data, top_k=None))):
        student = tiny_bert(1, seed=3, num_labels=3)
        args = cfg(out_dir, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1)
        trainer = DistillationTrainer(
            model=student, teacher=source, args=args, train_dataset=train_data, data_collator=pad_batch
        )
        trainer.train()
        assert all(torch.isfinite(torch.tensor(h["kd_loss"])) for h in trainer.state.log_history if "kd_loss" in h)
        states.append(student.state_dict())
    for key in states[0]:
        assert torch.isfinite(states[0][key]).all(), key
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)


def test_infinite_reverse_kl_stops_training_with_a_clear_error(out_dir):
    student = tiny_bert(1, seed=3, num_labels=3)
    args = cfg(out_dir, kd_loss="reverse_kl", max_steps=1, per_device_train_batch_size=4)
    trainer = DistillationTrainer(
        model=student, teacher=_masking_teacher(), args=args, train_dataset=_three_class_data(), data_collator=pad_batch
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match="kd_loss='reverse_kl' is infinite.*Use 'jsd'"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_list_labels_for_a_single_label_head_are_rejected(out_dir):
    bad = datasets.Dataset.from_dict({"input_ids": [[3, 4, 5]], "labels": [[0, 1]]})
    with pytest.raises(ValueError, match="single-label classification one class index"):
        DistillationTrainer(
            model=tiny_bert(1, problem_type="single_label_classification"),
            teacher=tiny_bert(2, problem_type="single_label_classification"),
            args=cfg(out_dir),
            train_dataset=bad,
        )
