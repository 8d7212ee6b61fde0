"""Tiny models built from configs (no downloads) and toy datasets shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB = 24


def tiny_bert(num_layers: int = 4, hidden: int = 32, num_labels: int = 2, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )
    return BertForSequenceClassification(config)


def tiny_llama(num_layers: int = 4, hidden: int = 32, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def first_token_rule(n: int, seed: int, seq_len: int = 8, flip: float = 0.0) -> datasets.Dataset:
    """Label 1 iff the first real token is in the upper half of the vocabulary; `flip` of labels are corrupted."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
    labels = (ids[:, 0] >= (VOCAB + 3) // 2).long()
    flips = torch.rand(n, generator=g) < flip
    labels = torch.where(flips, 1 - labels, labels)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
    rows = [ids[i, : lengths[i]].tolist() for i in range(n)]
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": labels.tolist()}
    )


def lm_dataset(n: int, seed: int, seq_len: int = 12) -> datasets.Dataset:
    """Sequences following a fixed cyclic pattern with random starting points (learnable next-token structure)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, VOCAB, (n,), generator=g)
    rows = [[3 + (int(s) - 3 + 2 * j) % (VOCAB - 3) for j in range(seq_len)] for s in starts]
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * seq_len] * n, "labels": [list(r) for r in rows]}
    )


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "run")
