"""Bad input: a clear ValueError at construction time, before any training step."""

import pytest
import torch
from conftest import first_token_rule, lm_dataset, tiny_bert, tiny_llama

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cache import pad_batch


def cfg(out_dir, **overrides):
    return DistillationConfig(output_dir=out_dir, report_to=[], use_cpu=True, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, r"temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\].*got 1.5"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"kd_loss": "kl"}, r"Unknown kd_loss 'kl'. Choose one of"),
        ({"jsd_beta": 2.0}, r"jsd_beta must be in \[0, 1\]"),
        ({"hidden_loss": "l1"}, r"Unknown hidden_loss 'l1'"),
        ({"teacher_dtype": "int8"}, r"Unknown teacher_dtype 'int8'"),
        ({"layer_map": "{1: 2"}, r"layer_map must be a JSON object"),
    ],
)
def test_config_rejects_bad_values(out_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg(out_dir, **overrides)


def test_layer_map_accepts_json_string(out_dir):
    assert cfg(out_dir, layer_map='{"1": 2, "2": 4}').layer_map == {1: 2, 2: 4}


def _build(out_dir, student, teacher, data, **overrides):
    return DistillationTrainer(
        model=student, teacher=teacher, args=cfg(out_dir, **overrides), train_dataset=data, data_collator=pad_batch
    )


def test_vocabulary_mismatch_causal_lm(out_dir):
    with pytest.raises(ValueError, match="Teacher vocabulary size 30 differs from the student's 24"):
        _build(out_dir, tiny_llama(2), tiny_llama(2, vocab=30), lm_dataset(4, 0))


def test_label_count_and_label2id_mismatch(out_dir):
    with pytest.raises(ValueError, match="Teacher has 3 labels but the student 2"):
        _build(out_dir, tiny_bert(1), tiny_bert(2, num_labels=3), first_token_rule(4, 0))
    teacher = tiny_bert(2, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    student = tiny_bert(1, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    with pytest.raises(ValueError, match="label2id .* differs from the student's"):
        _build(out_dir, student, teacher, first_token_rule(4, 0))


def test_layer_map_out_of_range(out_dir):
    with pytest.raises(ValueError, match=r"layer_map entry 1 -> 9 is out of range.*teacher hidden states 0..2"):
        _build(out_dir, tiny_bert(1), tiny_bert(2), first_token_rule(4, 0), layer_map={1: 9}, hidden_loss_weight=1.0)


def test_teacher_on_meta_device(out_dir):
    with torch.device("meta"):
        teacher = tiny_bert(2)
    with pytest.raises(ValueError, match="meta device"):
        _build(out_dir, tiny_bert(1), teacher, first_token_rule(4, 0))


def test_dataset_without_labels_needs_alpha_one(out_dir):
    data = first_token_rule(8, 0).remove_columns("labels")
    with pytest.raises(ValueError, match=r"alpha=0.5 .* no label column .* set alpha=1.0"):
        _build(out_dir, tiny_bert(1), tiny_bert(2), data)
    trainer = _build(out_dir, tiny_bert(1), tiny_bert(2), data, alpha=1.0, max_steps=1)
    trainer.train()  # pure KD runs without labels
    assert trainer.state.global_step == 1 and trainer.state.log_history[-1]["train_kd_loss"] > 0


def test_no_teacher_without_cache(out_dir):
    with pytest.raises(ValueError, match="teacher=None needs a train dataset with cached teacher logits"):
        _build(out_dir, tiny_bert(1), None, first_token_rule(4, 0))


def test_same_object_and_task_mismatch(out_dir):
    student = tiny_bert(1)
    with pytest.raises(ValueError, match="same object"):
        _build(out_dir, student, student, first_token_rule(4, 0))
    with pytest.raises(ValueError, match="The teacher solves causal-lm but the student sequence-classification"):
        _build(out_dir, tiny_bert(1), tiny_llama(2), first_token_rule(4, 0))


def test_errors_come_before_any_work(out_dir, tmp_path):
    target = tmp_path / "untouched"
    with pytest.raises(ValueError):
        DistillationTrainer(
            model=tiny_bert(1),
            teacher=tiny_bert(2, num_labels=3),
            args=cfg(str(target)),
            train_dataset=first_token_rule(4, 0),
        )
    assert not target.exists()
