"""Loss normalisation: every term is a mean over exactly the positions it covers, in train and eval, whatever the
task, architecture, accumulation or batch sizes."""

import datasets
import pytest
import torch
from conftest import VOCAB, first_token_rule, lm_dataset, tiny_bert, tiny_llama
from torch.nn import functional as F
from transformers import BertConfig, BertForTokenClassification, GPT2Config, GPT2LMHeadModel

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cache import pad_batch


def cfg(out_dir, **overrides):
    base = dict(
        output_dir=out_dir,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
    )
    base.update(overrides)
    return DistillationConfig(**base)


def tiny_gpt2(seed, vocab=50):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def tiny_token_classifier(seed):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForTokenClassification(config)


def _lm_data(vocab, lengths=(6, 6, 6), masked=0):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    data = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
    data["labels"] = [[-100] * masked + r[masked:] for r in rows]
    return datasets.Dataset.from_dict(data)


def _sharpened(model, factor=30.0):
    """Random tiny heads give near-uniform outputs; scaled up, KD values are O(1) and not float noise."""
    with torch.no_grad():
        model.classifier.weight.mul_(factor)
    return model


SETUPS = {
    "gpt2": (tiny_gpt2, lambda: _lm_data(50), "causal"),
    "gpt2_prompt_masked": (tiny_gpt2, lambda: _lm_data(50, (4, 6, 9), masked=2), "causal"),
    "llama": (lambda seed: tiny_llama(2, seed=seed), lambda: _lm_data(VOCAB, (5, 7, 6), masked=1), "causal"),
    "bert_token": (
        lambda seed: _sharpened(tiny_token_classifier(seed)),
        lambda: first_token_rule(5, 7).map(lambda ex: {"labels": [-100] + [t % 3 for t in ex["input_ids"][1:]]}),
        "token",
    ),
    "bert_sequence": (lambda seed: _sharpened(tiny_bert(2, seed=seed)), lambda: first_token_rule(5, 3), "sequence"),
}


def _mean_forward_kl(student, teacher, data, kind):
    """The reference, picked by hand: the KL at each position that has a target, averaged."""
    batch = pad_batch([data[i] for i in range(len(data))])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]

    def rows(model):
        with torch.no_grad():
            logits = model.eval()(**inputs).logits
        if kind == "causal":  # position i predicts token i + 1
            return logits[:, :-1][labels[:, 1:] != -100]
        return logits[labels != -100] if kind == "token" else logits

    s, t = rows(student), rows(teacher)
    assert kind == "sequence" or len(s) < labels.numel()  # some positions do not count
    return float((t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_logged_kd_loss_is_the_mean_over_the_positions_used(setup, out_dir):
    make, make_data, kind = SETUPS[setup]
    student, teacher, data = make(1), make(2), make_data()
    expected = _mean_forward_kl(student, teacher, data, kind)
    args = cfg(
        out_dir,
        alpha=1.0,
        temperature=1.0,
        learning_rate=0.0,
        max_steps=1,
        logging_steps=1,
        per_device_train_batch_size=len(data),
        per_device_eval_batch_size=2,  # ragged eval batches: 2 + 1 (+ 2)
    )
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=data, eval_dataset=data, data_collator=pad_batch
    )
    trainer.train()
    train_log = next(h for h in trainer.state.log_history if "kd_loss" in h)
    assert train_log["kd_loss"] == pytest.approx(expected, rel=1e-5)
    assert train_log["loss"] == pytest.approx(expected, rel=1e-5)
    metrics = trainer.evaluate()
    assert metrics["eval_kd_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def _ragged_lm_data(labels, n=4):
    data = lm_dataset(n, 3, seq_len=3 * n)
    data = data.map(lambda ex, i: {k: ex[k][: 2 + 3 * i] for k in ex}, with_indices=True)
    return data if labels else data.remove_columns("labels")


def _update(out_dir, make, data, batch, accumulation, max_steps=1, **overrides):
    student, teacher = make(4), make(7)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    args = cfg(
        out_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_strategy="no",
        **overrides,
    )
    DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data, data_collator=pad_batch).train()
    return {k: v - start[k] for k, v in student.state_dict().items()}


ACCUMULATION_CASES = {
    # 3 examples: micro-batches of 2 and 1 (a short last accumulation step) against one batch of 3.
    "bert_no_labels": (lambda s: tiny_bert(2, seed=s), first_token_rule(3, 3).remove_columns("labels"), {"alpha": 1.0}),
    "bert_hidden_attention": (
        lambda s: tiny_bert(2, seed=s),
        first_token_rule(4, 5),  # ragged lengths: micro-batches hold different numbers of tokens
        {"alpha": 0.5, "hidden_loss_weight": 1.0, "attention_loss_weight": 1.0},
    ),
    "bert_value_relation": (
        lambda s: tiny_bert(2, seed=s),
        first_token_rule(4, 5),
        {"alpha": 1.0, "attention_loss_weight": 100.0, "attention_loss": "value_relation"},
    ),
    "llama_no_labels": (lambda s: tiny_llama(2, seed=s), _ragged_lm_data(labels=False), {"alpha": 1.0}),
    "llama_hidden": (lambda s: tiny_llama(2, seed=s), _ragged_lm_data(labels=True), {"hidden_loss_weight": 1.0}),
    # 6 examples, 2 steps: [4] then [2] against [2, 2] then a short last accumulation step of one micro-batch [2].
    "llama_short_last_step": (
        lambda s: tiny_llama(2, seed=s),
        _ragged_lm_data(labels=False, n=6),
        {"alpha": 1.0, "hidden_loss_weight": 1.0, "max_steps": 2},
    ),
}


@pytest.mark.parametrize("case", sorted(ACCUMULATION_CASES))
def test_accumulation_gives_the_update_of_one_batch(case, out_dir):
    make, data, overrides = ACCUMULATION_CASES[case]
    one = _update(out_dir, make, data, batch=4, accumulation=1, **overrides)
    two = _update(out_dir, make, data, batch=2, accumulation=2, **overrides)
    assert max(float(v.abs().max()) for v in one.values()) > 1e-3  # the step is real
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=0, msg=key)


def test_eval_components_are_means_over_examples_not_over_batches(out_dir):
    student, teacher = _sharpened(tiny_bert(2, seed=1)), _sharpened(tiny_bert(2, seed=2))
    data = first_token_rule(5, 11)
    args = cfg(out_dir, alpha=0.3, temperature=2.0, per_device_eval_batch_size=2)  # batches of 2, 2, 1
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, eval_dataset=data, data_collator=pad_batch)
    metrics = trainer.evaluate()
    batch = pad_batch([data[i] for i in range(5)])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    hard = F.cross_entropy(s, batch["labels"])
    assert float(kd) > 0.01
    assert metrics["eval_kd_loss"] == pytest.approx(float(kd), rel=1e-5)
    assert metrics["eval_hard_loss"] == pytest.approx(float(hard), rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(0.3 * metrics["eval_kd_loss"] + 0.7 * metrics["eval_hard_loss"])
    # predict() reports the same components under its own prefix, uncontaminated by the evaluation before it.
    predicted = trainer.predict(data).metrics
    assert predicted["test_kd_loss"] == pytest.approx(metrics["eval_kd_loss"], rel=1e-6)


def test_eval_layer_terms_are_means_over_tokens(out_dir):
    student, teacher = tiny_bert(2, seed=1), tiny_bert(4, seed=2)
    data = first_token_rule(5, 12)
    args = cfg(out_dir, alpha=1.0, hidden_loss_weight=2.0, layer_map={2: 4}, per_device_eval_batch_size=2)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, eval_dataset=data, data_collator=pad_batch)
    metrics = trainer.evaluate()
    batch = pad_batch([data[i] for i in range(5)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
    with torch.no_grad():
        s, t = student(**inputs).hidden_states[2], teacher(**inputs).hidden_states[4]
    keep = batch["attention_mask"].bool()
    expected = float((s - t).pow(2).mean(-1)[keep].mean())
    assert metrics["eval_hidden_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_kd_loss"] + 2.0 * expected, rel=1e-5)


def test_train_components_pool_the_logging_window(out_dir):
    student, teacher = _sharpened(tiny_bert(2, seed=1)), _sharpened(tiny_bert(2, seed=2))
    data = first_token_rule(6, 13)  # steps of 4 and 2 examples, logged together
    args = cfg(
        out_dir,
        alpha=0.5,
        learning_rate=0.0,
        per_device_train_batch_size=4,
        num_train_epochs=1,
        logging_steps=2,
        per_device_eval_batch_size=6,
    )
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=data, eval_dataset=data, data_collator=pad_batch
    )
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "kd_loss" in h)
    metrics = trainer.evaluate()  # one batch of all 6: the reference
    final = trainer.state.log_history[-2]  # train()'s summary, before evaluate()'s metrics
    for name in ("kd_loss", "hard_loss"):
        assert logged[name] == pytest.approx(metrics[f"eval_{name}"], rel=1e-5), name
        assert final[f"train_{name}"] == pytest.approx(metrics[f"eval_{name}"], rel=1e-5), name
