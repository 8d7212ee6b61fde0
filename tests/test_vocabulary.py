"""Teacher and student vocabularies: padded embedding sizes of one tokenizer, different tokenizers, label collators."""

import logging

import datasets
import pytest
import torch
from conftest import distill_args, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_distill import DistillationTrainer, cache_teacher_logits
from hf_distill.cache import pad_batch
from hf_distill.losses import distillation_loss

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(16))]  # 20 real tokens


def word_tokenizer(words=WORDS):
    vocab = {word: i for i, word in enumerate(words)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_qwen2(vocab, seed=0, layers=2):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def saved_teacher(folder, vocab=32, tokenizer=None):
    """A padded-vocabulary teacher saved with its tokenizer, loaded back (so it knows its folder)."""
    tiny_qwen2(vocab, seed=1).save_pretrained(folder)
    (tokenizer or word_tokenizer()).save_pretrained(folder)
    return Qwen2ForCausalLM.from_pretrained(folder)


def text_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokenizer = word_tokenizer()
    rows = [" ".join(f"w{int(i)}" for i in torch.randint(0, 16, (5 + k % 4,), generator=g)) for k in range(n)]
    return datasets.Dataset.from_dict(dict(tokenizer(rows)))


def cfg(out_dir, **overrides):
    return distill_args(out_dir, **({"max_steps": 2, "alpha": 1.0, "kd_chunk_size": 5} | overrides))


def test_padded_vocabulary_teacher_compares_the_tokenizer_tokens_and_says_so_once(out_dir, tmp_path, caplog):
    teacher = saved_teacher(tmp_path / "teacher", vocab=32)
    data = text_data()
    with caplog.at_level(logging.WARNING, logger="hf_distill"):
        trainer = DistillationTrainer(
            model=tiny_qwen2(24, seed=2),
            teacher=teacher,
            args=cfg(out_dir),
            train_dataset=data,
            processing_class=word_tokenizer(),
            data_collator=pad_batch,
        )
        trainer.train()
    assert trainer.state.global_step == 2
    lines = [r.getMessage() for r in caplog.records if "padded vocabularies" in r.getMessage()]
    assert lines == [
        "Teacher and student output 32 and 24 logits (padded vocabularies of one tokenizer): the KD loss "
        "compares the first 20, the tokenizer's tokens."
    ]
    batch = pad_batch([data[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        s = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1, :20]
        t = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1, :20]
    mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    expected = distillation_loss(s, t, temperature=2.0, mask=mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_padded_vocabulary_cache_follows_the_same_rule(out_dir, tmp_path):
    data = text_data()
    cached = cache_teacher_logits(saved_teacher(tmp_path / "teacher"), data, top_k=4, temperature=2.0)
    trainer = DistillationTrainer(
        model=tiny_qwen2(24, seed=2),
        args=cfg(out_dir),
        train_dataset=cached,
        processing_class=word_tokenizer(),
        data_collator=pad_batch,
    )
    assert trainer.class_match.compared == 20 and trainer.class_match.teacher == 32
    trainer.train()
    with pytest.raises(ValueError, match="Teacher vocabulary size 32 differs from the student's 24: .* pass it as"):
        DistillationTrainer(model=tiny_qwen2(24), args=cfg(out_dir), train_dataset=cached, data_collator=pad_batch)


def test_tokenizer_beyond_the_smaller_embedding_is_refused(out_dir, tmp_path):
    wide = word_tokenizer([*WORDS, *(f"x{i}" for i in range(10))])  # 30 tokens
    with pytest.raises(ValueError, match="tokenizer has 30 tokens, more than the 24 embedding rows"):
        DistillationTrainer(
            model=tiny_qwen2(24),
            teacher=saved_teacher(tmp_path / "teacher", tokenizer=wide),
            args=cfg(out_dir),
            train_dataset=text_data(),
            processing_class=wide,
        )


def test_different_tokenizers_are_refused(out_dir, tmp_path):
    teacher = saved_teacher(tmp_path / "teacher", vocab=24)
    other = word_tokenizer([*WORDS[:4], *reversed(WORDS[4:])])  # same tokens, other ids
    with pytest.raises(ValueError, match=r"different tokenizers: 'w\d+' is id \d+ for the student and \d+ .*cross-"):
        DistillationTrainer(
            model=tiny_qwen2(24), teacher=teacher, args=cfg(out_dir), train_dataset=text_data(), processing_class=other
        )
    # A tokenizer that only appends tokens (an added pad token, say) reads every shared id the same way.
    appended = word_tokenizer([*WORDS, "<extra>"])
    DistillationTrainer(
        model=tiny_qwen2(24), teacher=teacher, args=cfg(out_dir), train_dataset=text_data(), processing_class=appended
    )


def test_language_modeling_collator_labels_are_accepted_at_alpha_below_one(out_dir):
    tokenizer = word_tokenizer()
    data = text_data()
    assert "labels" not in data.column_names
    trainer = DistillationTrainer(
        model=tiny_llama(2, seed=2),
        teacher=tiny_llama(2, seed=1),
        args=cfg(out_dir, alpha=0.5, logging_strategy="steps", logging_steps=1),
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "hard_loss" in entry]
    assert len(logged) == 2 and all(entry["hard_loss"] > 0 for entry in logged)
    with pytest.raises(ValueError, match="no label column .* and the data collator adds none"):
        DistillationTrainer(
            model=tiny_llama(2),
            teacher=tiny_llama(2, seed=1),
            args=cfg(out_dir, alpha=0.5),
            train_dataset=data,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
