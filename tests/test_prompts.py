"""Prompt refinement with PEFT: adapter-only training, virtual-token alignment, prompt distillation, named prompts,
export of prompt-tuned students (prompt baked in or as an input), unsupported combinations."""

import copy
import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, first_token_rule, lm_dataset, minilm_tokenizer, text_model, tiny_bert, tiny_llama
from peft import PrefixTuningConfig, TaskType

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cache import pad_batch
from hf_distill.data import load_sst2, minilm_path
from hf_distill.export.onnx import export_onnx
from hf_distill.prompts import load_prompt, make_peft_student, prompt_refine_config, save_prompt, use_prompt
from hf_distill.tasks import Task

PROMPT = (
    "You are a film critic. Read the review below and decide whether the reviewer liked the movie; reviews that "
    "praise acting, story or direction are positive, reviews that complain are negative."
)


def cfg(out_dir, **overrides):
    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=5e-2,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return DistillationConfig(**base)


def test_only_adapter_and_head_train(out_dir):
    teacher = tiny_bert(2, seed=1)
    student = make_peft_student(
        copy.deepcopy(teacher), prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random")
    )
    before = {n: p.clone() for n, p in student.named_parameters()}
    DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, max_steps=4),
        train_dataset=first_token_rule(32, 0),
        data_collator=pad_batch,
    ).train()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("prompt_encoder" in n or "modules_to_save" in n for n in changed), changed
    assert any("prompt_encoder" in n for n in changed)
    frozen = [n for n in before if "prompt_encoder" not in n and "modules_to_save" not in n]
    assert frozen and all(n not in changed for n in frozen)


@pytest.mark.parametrize("method", ["p_tuning", "lora"])
def test_p_tuning_and_lora_students_train(out_dir, method):
    teacher = tiny_bert(2, seed=1)
    student = make_peft_student(
        copy.deepcopy(teacher),
        prompt_refine_config("sequence-classification", 4, method=method, target_modules=["query"]),
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, max_steps=2),
        train_dataset=first_token_rule(16, 0),
        data_collator=pad_batch,
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_causal_prompt_tuning_aligns_virtual_tokens(out_dir):
    teacher = tiny_llama(2, seed=1)
    student = make_peft_student(tiny_llama(2, seed=2), prompt_refine_config(Task.CAUSAL_LM, 5, init="random"))
    data = lm_dataset(4, 0)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, alpha=1.0, temperature=1.0),
        train_dataset=data,
        data_collator=pad_batch,
    )
    batch = pad_batch([data[i] for i in range(3)])
    loss = trainer.compute_loss(student.eval(), dict(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
    assert s.shape[1] == t.shape[1] + 5
    s, t = s[:, 5:-1], t[:, :-1]  # drop the virtual positions, then shift for next-token prediction
    manual = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.fixture(scope="module")
def sst2_tiny(tmp_path_factory):
    """A tiny BERT with the real MiniLM tokenizer, trained for a few seconds on real SST-2 sentences."""
    from transformers import Trainer, TrainingArguments

    tokenizer = minilm_tokenizer()
    model = text_model(hidden=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = load_sst2(train_size=2096)
    encode = lambda b: {**tokenizer(b["sentence"], truncation=True, max_length=32), "labels": b["label"]}  # noqa: E731
    train = data["train"].map(encode, batched=True, remove_columns=["sentence", "label"])
    held_out = data["validation"].select(range(64)).map(encode, batched=True, remove_columns=["sentence", "label"])
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("t")),
        num_train_epochs=2,
        learning_rate=2e-3,
        per_device_train_batch_size=32,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=train.select(range(96, 2096)), data_collator=pad_batch).train()
    return model.eval(), tokenizer, train.select(range(96)), held_out


def _teacher_student_gap(trainer, student, dataset):
    batch = pad_batch([dataset[i] for i in range(len(dataset))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = torch.softmax(trainer.teacher(**trainer.teacher_prompt.prepend(inputs)).logits, -1)
        s = torch.softmax(student(**inputs).logits, -1)
    kl = float((t * (t.log() - s.log())).sum(-1).mean())
    return kl, float((t.argmax(-1) == s.argmax(-1)).float().mean())


def test_prompt_distillation_moves_student_to_the_prompted_teacher(sst2_tiny, out_dir):
    teacher, tokenizer, train, held_out = sst2_tiny
    student = make_peft_student(
        copy.deepcopy(teacher),
        prompt_refine_config(
            Task.SEQUENCE_CLASSIFICATION, 8, init_text="film review sentiment", tokenizer_name_or_path=minilm_path()
        ),
    )
    for p in student.base_model.classifier.parameters():
        p.requires_grad_(False)  # only the soft prompt may absorb the long prompt's effect
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        processing_class=tokenizer,
        train_dataset=train,
        args=cfg(out_dir, alpha=1.0, temperature=1.0, num_train_epochs=8, teacher_prompt=PROMPT),
        data_collator=pad_batch,
    )
    kl_before, agree_before = _teacher_student_gap(trainer, student.eval(), held_out)
    trainer.train()
    kl_after, agree_after = _teacher_student_gap(trainer, student.eval(), held_out)
    assert kl_before > 0.05  # the long prompt matters to the teacher
    assert kl_after < 0.5 * kl_before and agree_after >= agree_before, (kl_before, kl_after, agree_before, agree_after)
    assert trainer.teacher_prompt.length > 30  # tokens the student no longer reads per request


def test_teacher_prompt_insertion_and_causal_realignment():
    from hf_distill.teacher_prompt import TeacherPrompt

    prompt = TeacherPrompt("be brief", minilm_tokenizer())
    ids = torch.tensor([[101, 7, 8, 102, 0]])
    out = prompt.prepend({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])})
    p = prompt.ids.tolist()
    assert out["input_ids"][0].tolist() == [101, *p, 7, 8, 102, 0]
    assert out["attention_mask"][0].tolist() == [1] * (4 + len(p)) + [0]
    # Causal: teacher logits at [BOS, p0..pP-1, x1, x2] realign to the student's [BOS, x1, x2]: the last prompt
    # position predicts x1, as the student's BOS position does.
    logits = torch.arange(3 + len(p)).float().view(1, -1, 1)
    assert prompt.drop_prompt_positions(logits).flatten().tolist() == [len(p), len(p) + 1, len(p) + 2]


def test_named_prompts_switch_without_reloading_backbone(tmp_path):
    base = tiny_bert(2, seed=3)
    model = make_peft_student(
        base, prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random"), adapter_name="sentiment"
    )
    model.add_adapter("topic", prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random"))
    with torch.no_grad():
        model.prompt_encoder["topic"].embedding.weight.mul_(5)
    sentiment_dir = save_prompt(model, tmp_path / "prompts", "sentiment")
    topic_dir = save_prompt(model, tmp_path / "prompts", "topic")
    ids = torch.tensor([[5, 9, 13, 20]])
    outputs = {}
    for name in ("sentiment", "topic"):
        use_prompt(model, name)
        outputs[name] = model.eval()(input_ids=ids).logits
    assert not torch.allclose(outputs["sentiment"], outputs["topic"])
    fresh = make_peft_student(
        tiny_bert(2, seed=3), prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random")
    )
    backbone = fresh.get_base_model()
    for name, folder in (("sentiment", sentiment_dir), ("topic", topic_dir)):
        load_prompt(fresh, folder, name)
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, outputs[name])
        assert fresh.get_base_model() is backbone
    with pytest.raises(ValueError, match="No prompt named 'missing'"):
        use_prompt(fresh, "missing")


def _peft_probs(model, tokenizer, texts):
    with torch.no_grad():
        return torch.softmax(model.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1).numpy()


@pytest.mark.parametrize("mode", ["baked", "input"])
def test_prompt_tuned_export_matches_peft_model(sst2_tiny, tmp_path, edge_python, mode):
    teacher, tokenizer, _, held_out = sst2_tiny
    student = make_peft_student(
        copy.deepcopy(teacher), prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 6, init="random")
    )
    with torch.no_grad():
        student.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    report = export_onnx(
        student,
        tmp_path / "onnx",
        variants=["fp32"],
        validation_data=held_out,
        tokenizer=tokenizer,
        prompt_mode=mode,
        max_metric_drop=0.0,
        max_length=600,
    )
    assert report["variants"][0]["max_abs_diff"] < 1e-4 and report["variants"][0]["passed"]
    manifest = json.loads((tmp_path / "onnx" / "hf_distill_manifest.json").read_text())
    assert manifest["prompt"]["mode"] == mode and manifest["max_length"] == 512 - 6  # the position budget
    assert ("prompt_embeds" in manifest["inputs"]) == (mode == "input")
    texts = ["a gripping , funny film", "dull and far too long"]
    result = subprocess.run(
        [edge_python, str(ROOT / "hf_distill" / "edge.py"), str(tmp_path / "onnx"), *texts],
        capture_output=True,
        text=True,
        check=True,
    )
    probs = [json.loads(line)["probabilities"] for line in result.stdout.splitlines()]
    np.testing.assert_allclose(probs, _peft_probs(student, tokenizer, texts), atol=1e-5)
    if mode == "input":  # the same backbone serves another task's prompt file
        other = tmp_path / "other.npy"
        np.save(other, np.random.default_rng(0).normal(size=(6, teacher.config.hidden_size)).astype(np.float32))
        with torch.no_grad():
            student.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(np.load(other)))
        result = subprocess.run(
            [
                edge_python,
                str(ROOT / "hf_distill" / "edge.py"),
                str(tmp_path / "onnx"),
                "--prompt",
                str(other),
                *texts,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        probs = [json.loads(line)["probabilities"] for line in result.stdout.splitlines()]
        np.testing.assert_allclose(probs, _peft_probs(student, tokenizer, texts), atol=1e-5)
    long_text = "good " * 600
    result = subprocess.run(
        [edge_python, str(ROOT / "hf_distill" / "edge.py"), str(tmp_path / "onnx"), long_text],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "longer than this export's 506" in result.stderr


def test_prompt_tuned_causal_lm_export(tmp_path):
    student = make_peft_student(tiny_llama(2, seed=2), prompt_refine_config(Task.CAUSAL_LM, 3, init="random"))
    report = export_onnx(
        student, tmp_path / "lm", variants=["fp32"], validation_data=lm_dataset(8, 0), max_metric_drop=0.01
    )
    assert report["variants"][0]["max_abs_diff"] < 1e-4


def test_unsupported_combinations_are_clear_errors(out_dir, tmp_path):
    with pytest.raises(ValueError, match="Prefix tuning needs past key values.*prompt_tuning"):
        make_peft_student(tiny_bert(1), PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    with pytest.raises(ValueError, match="Prefix tuning needs past key values"):
        prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, method="prefix_tuning")
    teacher = tiny_bert(2)
    prompt_student = make_peft_student(
        copy.deepcopy(teacher), prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random")
    )
    with pytest.raises(ValueError, match="Attention matching cannot align"):
        DistillationTrainer(
            model=prompt_student,
            teacher=teacher,
            args=cfg(out_dir, attention_loss_weight=1.0),
            train_dataset=first_token_rule(8, 0),
        )
    with pytest.raises(ValueError, match="teacher_prompt needs the tokenizer"):
        DistillationTrainer(
            model=prompt_student,
            teacher=teacher,
            args=cfg(out_dir, teacher_prompt="Be nice."),
            train_dataset=first_token_rule(8, 0),
        )
    shared = make_peft_student(teacher, prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random"))
    with pytest.raises(ValueError, match="shares trainable weights with the student"):
        DistillationTrainer(model=shared, teacher=teacher, args=cfg(out_dir), train_dataset=first_token_rule(8, 0))
    prefix_lm = make_peft_student(tiny_llama(2), prompt_refine_config(Task.CAUSAL_LM, 4, method="prefix_tuning"))
    with pytest.raises(ValueError, match="Prefix tuning lives in the attention cache"):
        export_onnx(prefix_lm, tmp_path / "x", validation_data=lm_dataset(4, 0))
    with pytest.raises(ValueError, match="Text initialisation needs"):
        prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, init="text")
