"""Pre-split words (token classification): every tokenizer must give each word the sub-words of running text."""

import json
import os
import sys

import datasets
import pytest
from conftest import minilm_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, RobertaConfig, RobertaForTokenClassification, RobertaTokenizerFast

from hf_distill.data import encode_words, tokenize_tagged_words

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
import token_classification  # noqa: E402

SENTENCES = [
    "the king rules the land and the queen sings",
    "a king and a queen walk in the hall",
    "the old king sings to the land",
    "kings and queens rule the old hall",
]
WORDS = "the old king rules the land and the queen sings".split()  # 9 non-initial words
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def byte_level_bpe(folder, trim_offsets: bool = True):
    """A RoBERTa-style tokenizer (ByteLevel pre-tokenizer without a prefix space, BPE), trained here, saved, reloaded
    with AutoTokenizer as the recipe loads a teacher's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=trim_offsets)
    special = dict(zip(("bos_token", "pad_token", "eos_token", "unk_token", "mask_token"), SPECIALS, strict=True))
    RobertaTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tagged(rows):
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"tokens": rows, "tags": [["O"] * len(r) for r in rows]})
            for split in ("train", "validation")
        }
    )


@pytest.mark.parametrize("trim_offsets", [True, False])
def test_byte_level_bpe_words_get_their_running_text_sub_words(tmp_path, trim_offsets):
    tokenizer = byte_level_bpe(tmp_path / "bpe", trim_offsets)
    running = tokenizer.convert_ids_to_tokens(tokenizer(" ".join(WORDS))["input_ids"])
    encoded = token_classification.align(tokenizer, tagged([WORDS]), ["O"], 64)["train"][0]
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == running
    first_pieces = [t for t, label in zip(tokens, encoded["labels"], strict=True) if label != -100]
    assert len(first_pieces) == len(WORDS)
    assert sum(piece.startswith("Ġ") for piece in first_pieces[1:]) == len(WORDS) - 1  # 9 of 9 non-initial words
    # Each labelled piece starts its word: decoding the pieces of word i gives word i back.
    word_ids = encode_words(tokenizer, [WORDS])["word_ids"][0]
    for index, word in enumerate(WORDS):
        pieces = [i for i, w in zip(encoded["input_ids"], word_ids, strict=True) if w == index]
        assert tokenizer.decode(pieces).strip() == word


def test_wordpiece_encoding_is_unchanged_and_empty_words_get_no_tag():
    tokenizer = minilm_tokenizer()
    words = ["EU", "rejects", "German", "call", "", "to", "boycott", "British", "lamb", "."]
    old = tokenizer([w for w in words if w], is_split_into_words=True)
    encoded = encode_words(tokenizer, [words])
    assert encoded["input_ids"][0] == old["input_ids"]
    assert sorted({w for w in encoded["word_ids"][0] if w is not None}) == [i for i, w in enumerate(words) if w]
    tags = [f"T{i}" for i in range(len(words))]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"tokens": [words], "tags": [tags]})})
    labels = tokenize_tagged_words(tokenizer, raw, tags, 64)["train"][0]["labels"]
    assert [x for x in labels if x != -100] == [i for i, w in enumerate(words) if w]


def test_tag_count_mismatch_is_a_clear_error():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"tokens": [["a", "b"]], "tags": [["O"]]})})
    with pytest.raises(ValueError, match="has 2 words and tags"):
        tokenize_tagged_words(minilm_tokenizer(), raw, ["O"], 16)


def test_token_classification_recipe_runs_with_a_byte_level_bpe_teacher(tmp_path):
    tokenizer = byte_level_bpe(tmp_path / "teacher")
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    RobertaForTokenClassification(config).save_pretrained(tmp_path / "teacher")
    rows = [{"tokens": s.split(), "tags": ["K" if "king" in w else "O" for w in s.split()]} for s in SENTENCES * 4]
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = token_classification.main(
        ["--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "dev.jsonl")]
        + ["--teacher", str(tmp_path / "teacher"), "--student_layers", "1", "--output_dir", str(tmp_path / "run")]
        + ["--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "true"]
        + ["--save_strategy", "no", "--disable_tqdm", "true"]
    )
    assert results["labels"] == ["K", "O"] and 0 <= results["student"]["accuracy"] <= 1
