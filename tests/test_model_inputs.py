"""How inputs reach the models: last attended position for decoder classifiers (soft prompts, no pad id), the
union of student and teacher inputs (token_type_ids), position ids from the attention mask (left padding)."""

import datasets
import pytest
import torch
from conftest import VOCAB, first_token_rule, lm_dataset, tiny_bert
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from hf_distill import DistillationConfig, DistillationTrainer, cache_teacher_logits
from hf_distill.cache import TOPK_LOGITS, pad_batch
from hf_distill.forward import run_model
from hf_distill.prompts import make_peft_student, prompt_refine_config
from hf_distill.tasks import last_attended_position, position_ids_from_mask

DECODERS = {
    "gpt2": (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel),
    "llama": (LlamaConfig, LlamaForSequenceClassification, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForSequenceClassification, None),
}


def tiny_decoder(kind: str, causal_lm: bool = False, seed: int = 0, pad_token_id: int | None = 0, layers: int = 2):
    """A 2-layer decoder over the toy vocabulary: a classifier (2 labels) or a causal LM."""
    config_class, classifier, lm = DECODERS[kind]
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":
        config = config_class(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    else:
        config = config_class(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    return (lm if causal_lm else classifier)(config)


def cfg(out_dir, **overrides):
    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        alpha=1.0,
        temperature=2.0,
        max_steps=1,
    )
    base.update(overrides)
    return DistillationConfig(**base)


def ragged_rows(n: int = 4, seed: int = 3) -> datasets.Dataset:
    """Classification rows of 3 to 8 tokens (ids >= 3: never the pad id 0), right-padded by pad_batch."""
    return (
        first_token_rule(n, seed)
        .map(lambda ex, i: {"input_ids": ex["input_ids"][: 3 + i]}, with_indices=True)
        .map(lambda ex: {"attention_mask": [1] * len(ex["input_ids"])})
    )


def per_row_check(trainer, data):
    """Batch loss and logits vs. each row alone (one row has no padding: every code path scores it right)."""
    model = trainer.model.eval()
    batch = pad_batch([data[i] for i in range(len(data))])
    assert int((batch["attention_mask"] == 0).sum()) > 0  # rows really are padded
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    alone = [trainer.compute_loss(model, dict(pad_batch([data[i]])), return_outputs=True) for i in range(len(data))]
    torch.testing.assert_close(outputs.logits, torch.cat([o.logits for _, o in alone]), atol=1e-5, rtol=1e-4)
    assert loss.item() == pytest.approx(sum(x.item() for x, _ in alone) / len(data), rel=1e-4)


# --- case 1: decoder classifiers score the last attended position -------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_soft_prompted_decoder_classifier_scores_last_real_token(out_dir, kind, method):
    student = make_peft_student(tiny_decoder(kind), prompt_refine_config("sequence-classification", 4, method=method))
    data = ragged_rows()
    trainer = DistillationTrainer(
        model=student, teacher=tiny_bert(2, seed=1), args=cfg(out_dir), train_dataset=data, data_collator=pad_batch
    )
    per_row_check(trainer, data)


@pytest.mark.parametrize("case", ["no pad_token_id", "pad id is a real token"])
def test_plain_decoder_classifier_teacher_and_student_score_last_attended_position(out_dir, case):
    # GPT-2 and Qwen2 configs come without a pad id; GPT-2 users often set it to eos, which also ends real rows.
    pad = None if case == "no pad_token_id" else 5
    data = ragged_rows().map(lambda ex: {"input_ids": ex["input_ids"][:-1] + [5]})  # every row ends with token 5
    trainer = DistillationTrainer(
        model=tiny_decoder("qwen2", seed=2, pad_token_id=pad),
        teacher=tiny_decoder("gpt2", seed=1, pad_token_id=pad),
        args=cfg(out_dir),
        train_dataset=data,
        data_collator=pad_batch,
    )
    per_row_check(trainer, data)
    assert trainer.model.config.pad_token_id == pad  # the user's config is left as it was


def test_soft_prompted_teacher_scores_last_real_token(out_dir):
    teacher = make_peft_student(tiny_decoder("gpt2", seed=1), prompt_refine_config("sequence-classification", 4))
    teacher.requires_grad_(False)
    data = ragged_rows()
    trainer = DistillationTrainer(
        model=tiny_decoder("llama", seed=2),
        teacher=teacher,
        args=cfg(out_dir),
        train_dataset=data,
        data_collator=pad_batch,
    )
    per_row_check(trainer, data)


def test_soft_prompted_classifier_eval_and_predict_score_last_real_token(out_dir):
    student = make_peft_student(tiny_decoder("gpt2"), prompt_refine_config("sequence-classification", 4))
    data = ragged_rows(6)
    trainer = DistillationTrainer(
        model=student,
        teacher=tiny_bert(2, seed=1),
        args=cfg(out_dir, per_device_eval_batch_size=6),
        train_dataset=data,
        eval_dataset=data,
        data_collator=pad_batch,
    )
    student.eval()
    with torch.no_grad():
        alone = torch.cat(
            [
                student(**{k: torch.tensor([data[i][k]]) for k in ("input_ids", "attention_mask")}).logits
                for i in range(len(data))
            ]
        )
    for dataset in (data, data.remove_columns("labels")):  # with labels through compute_loss, without alone
        predictions = trainer.predict(dataset).predictions
        torch.testing.assert_close(torch.as_tensor(predictions), alone, atol=1e-5, rtol=1e-4)
    rows = [trainer.compute_loss(student, dict(pad_batch([data[i]]))).item() for i in range(len(data))]
    assert trainer.evaluate()["eval_kd_loss"] == pytest.approx(sum(rows) / len(rows), rel=1e-4)


def test_mask_helpers():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert last_attended_position(mask).tolist() == [2, 4, 0, 0]
    assert position_ids_from_mask(mask)[:2].tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2]]


# --- case 2: the union of what student and teacher accept, each model gets its own ------------------------------


def pair_models():
    """A BERT teacher whose segment embeddings matter, and a DistilBERT student (no token_type_ids)."""
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    with torch.no_grad():  # confident, and segment-sensitive: what a fine-tuned pair teacher is
        teacher.bert.embeddings.token_type_embeddings.weight.mul_(50)
        teacher.classifier.weight.mul_(200)
    student = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64, dropout=0.0)
    )
    return teacher.eval(), student


def pair_rows(n: int = 8) -> datasets.Dataset:
    """Sentence pairs: segment 0 then segment 1, with token_type_ids marking them."""
    rows = ragged_rows(n)
    return rows.map(lambda ex: {"token_type_ids": [0] * 2 + [1] * (len(ex["input_ids"]) - 2)})


def expected_kd(teacher, student, batch, temperature=2.0):
    with torch.no_grad():
        t = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_p, log_q = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2)


def test_teacher_gets_token_type_ids_the_student_does_not_take(out_dir):
    teacher, student = pair_models()
    data = pair_rows()
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg(out_dir, per_device_train_batch_size=8),  # remove_unused_columns=True, as by default
        train_dataset=data,
        eval_dataset=data,
        data_collator=pad_batch,
    )
    expected = expected_kd(teacher, student.eval(), pad_batch([data[i] for i in range(len(data))]))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "token_type_ids" in batch
    assert trainer.compute_loss(student.eval(), dict(batch)).item() == pytest.approx(expected, rel=1e-4)
    assert trainer.evaluate()["eval_kd_loss"] == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        plain = student(**{k: torch.tensor([data[0][k]]) for k in ("input_ids", "attention_mask")}).logits
    predictions = trainer.predict(data.remove_columns("labels")).predictions
    torch.testing.assert_close(torch.as_tensor(predictions[:1]), plain, atol=1e-5, rtol=1e-4)
    # Offline: the cache holds the same teacher, so the cached loss is the online one.
    cached = cache_teacher_logits(teacher, data, top_k=None, batch_size=3)
    offline = DistillationTrainer(model=student, args=cfg(out_dir), train_dataset=cached, data_collator=pad_batch)
    cached_batch = next(iter(offline.get_train_dataloader()))
    assert offline.compute_loss(student, dict(cached_batch)).item() == pytest.approx(expected, rel=1e-4)


def test_cached_predict_without_labels_sends_no_cache_columns_to_the_student(out_dir):
    teacher, student = pair_models()
    cached = cache_teacher_logits(teacher, pair_rows(), top_k=None)
    trainer = DistillationTrainer(
        model=student, args=cfg(out_dir, remove_unused_columns=False), train_dataset=cached, data_collator=pad_batch
    )
    predictions = trainer.predict(cached.remove_columns("labels")).predictions
    assert predictions.shape == (8, 2)


# --- case 3: position ids from the attention mask (left padding) ----------------------------------------------


def left_pad(features):
    """pad_batch, but padded on the left (token labels -100 on the padding)."""
    batch = pad_batch(features)
    width = batch["input_ids"].shape[1]
    fills = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    for key, fill in fills.items():
        if key in features[0] and isinstance(features[0][key], list):
            batch[key] = torch.tensor([[fill] * (width - len(f[key])) + list(f[key]) for f in features])
    return batch


def ragged_lm(n: int = 5) -> datasets.Dataset:
    return lm_dataset(n, 4).map(
        lambda ex, i: {k: ex[k][: 5 + i] for k in ("input_ids", "attention_mask", "labels")}, with_indices=True
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2 prompt-tuned"])
def test_left_padding_gives_the_right_padded_loss(out_dir, kind):
    base = kind.split()[0]
    student = tiny_decoder(base, causal_lm=True, seed=2)
    if "prompt" in kind:
        student = make_peft_student(student, prompt_refine_config("causal-lm", 3))
    data = ragged_lm()
    trainer = DistillationTrainer(
        model=student,
        teacher=tiny_decoder(base, causal_lm=True, seed=1, layers=3),
        args=cfg(out_dir, alpha=0.5),
        train_dataset=data,
        data_collator=pad_batch,
    )
    features = [data[i] for i in range(len(data))]
    right = trainer.compute_loss(student.eval(), dict(pad_batch(features)))
    left = trainer.compute_loss(student, dict(left_pad(features)))
    assert left.item() == pytest.approx(right.item(), rel=1e-5)


@pytest.mark.parametrize("causal_lm", [True, False])
def test_cached_logits_do_not_depend_on_the_padding_side(causal_lm):
    teacher = tiny_decoder("gpt2", causal_lm=causal_lm, seed=1)
    data = ragged_lm() if causal_lm else ragged_rows(5)
    right = cache_teacher_logits(teacher, data, top_k=None, batch_size=5)
    left = cache_teacher_logits(teacher, data, top_k=None, batch_size=5, data_collator=left_pad)
    for a, b in zip(right[TOPK_LOGITS], left[TOPK_LOGITS], strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-4)


def test_position_ids_in_the_batch_are_kept():
    model = tiny_decoder("gpt2", causal_lm=True).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    batch["position_ids"] = torch.tensor([[10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(run_model(model, batch).logits, model(**batch).logits)
        assert not torch.allclose(run_model(model, batch).logits, model(input_ids=batch["input_ids"]).logits)


def test_accuracy_loop_scores_last_real_token_on_either_padding_side():
    from conftest import minilm_tokenizer

    from hf_distill.metrics import evaluate_accuracy

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=minilm_tokenizer().vocab_size, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    model = GPT2ForSequenceClassification(config)  # GPT-2's config has no pad_token_id
    texts = ["a gripping , funny film", "dull", "not bad at all , really", "bad", "the best film of the year"]
    rows = datasets.Dataset.from_dict({"text": texts, "labels": [1, 0, 1, 0, 1]})
    with torch.no_grad():
        alone = [int(model(**minilm_tokenizer()(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    expected = 100.0 * sum(p == y for p, y in zip(alone, rows["labels"], strict=True)) / len(texts)
    for side in ("right", "left"):
        tokenizer = minilm_tokenizer().__class__.from_pretrained(minilm_tokenizer().name_or_path, padding_side=side)
        data = rows.map(lambda ex, tok=tokenizer: tok(ex["text"]), remove_columns=["text"])
        assert evaluate_accuracy(model, data, tokenizer, batch_size=5) == pytest.approx(expected), side
