"""Chat data: labels on assistant tokens only, multi-turn conversations, truncation counted; real tokenizer."""

import copy

import datasets
import pytest
from conftest import minilm_tokenizer

from hf_distill.chat import tokenize_chat

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture
def tokenizer():
    tok = copy.deepcopy(minilm_tokenizer())
    tok.chat_template = TEMPLATE
    return tok


def _labelled_text(tokenizer, row):
    return tokenizer.decode([t for t in row["labels"] if t != -100])


def test_prompt_response_rows_label_the_response_only(tokenizer):
    data = datasets.Dataset.from_dict({"prompt": ["what is the capital of france?"], "response": ["paris is."]})
    out = tokenize_chat(data, tokenizer, system_prompt="be brief")
    row = out.dataset[0]
    assert _labelled_text(tokenizer, row) == "paris is. < / s >"  # the answer and its end-of-turn marker
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("< system > be brief") and "< user > what is the capital of france?" in text
    assert len(row["input_ids"]) == len(row["labels"]) == sum(row["attention_mask"])
    assert (out.num_truncated, out.num_dropped) == (0, 0)


def test_multi_turn_messages_label_every_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "good night"},
    ]
    row = tokenize_chat(datasets.Dataset.from_dict({"messages": [messages]}), tokenizer).dataset[0]
    labelled = _labelled_text(tokenizer, row)
    assert labelled == "hello there < / s > good night < / s >"
    assert "hi" not in labelled.split() and "bye" not in labelled.split()


def test_truncation_is_counted_and_empty_rows_dropped(tokenizer, caplog):
    data = datasets.Dataset.from_dict(
        {"prompt": ["short", "a " * 40], "response": ["one two three four five six seven eight", "never seen"]}
    )
    out = tokenize_chat(data, tokenizer, max_length=12)
    assert (out.num_truncated, out.num_dropped, len(out.dataset)) == (2, 1, 1)
    assert len(out.dataset[0]["input_ids"]) == 12 and out.dataset[0]["labels"][-1] != -100
    assert "were cut" in caplog.text


def test_chat_errors(tokenizer):
    with pytest.raises(ValueError, match="need 'messages' or 'prompt' and 'response'"):
        tokenize_chat(datasets.Dataset.from_dict({"text": ["x"]}), tokenizer)
    plain = copy.deepcopy(minilm_tokenizer())
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_chat(datasets.Dataset.from_dict({"prompt": ["x"], "response": ["y"]}), plain)
    long = datasets.Dataset.from_dict({"prompt": ["a " * 40, "b " * 40], "response": ["x", "y"]})
    with pytest.raises(
        ValueError, match="Every one of the 2 conversations lost all its assistant tokens.*raise max_len"
    ):
        tokenize_chat(long, tokenizer, max_length=12)


def test_chat_rows_train_without_a_hand_picked_collator(tmp_path):
    """Ragged tokenize_chat rows with per-token labels: the trainer's default collator pads labels with -100."""
    from conftest import distill_args
    from llm_assets import tiny_chat_llama

    from hf_distill import DistillationTrainer

    teacher, tok = tiny_chat_llama(layers=2, seed=1)
    student, _ = tiny_chat_llama(layers=1, seed=2)
    rows = datasets.Dataset.from_list(
        [{"prompt": "Say " + "red " * n, "response": "blue " * (n + 1)} for n in range(1, 5)]
    )
    data = tokenize_chat(rows, tok, max_length=64).dataset.select_columns(["input_ids", "attention_mask", "labels"])
    assert len({len(x) for x in data["input_ids"]}) > 1  # ragged: padding is needed
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=distill_args(str(tmp_path), alpha=0.5), train_dataset=data,
        processing_class=tok,
    )  # fmt: skip
    batch = trainer.data_collator([data[i] for i in range(4)])
    assert batch["labels"].shape == batch["input_ids"].shape and int((batch["labels"] == -100).sum()) > 0
    assert trainer.train().training_loss > 0


def test_rows_without_an_answer_are_dropped_and_counted(tokenizer, caplog):
    data = datasets.Dataset.from_list(
        [{"prompt": "a", "response": "yes"}, {"prompt": "b", "response": ""}, {"prompt": "c", "response": None},
         {"prompt": "d", "response": "   "}]
    )  # fmt: skip
    out = tokenize_chat(data, tokenizer, max_length=64)
    assert (len(out.dataset), out.num_dropped) == (1, 3)
    assert "3 of 4 rows have no assistant answer" in caplog.text
    with pytest.raises(ValueError, match="None of the 2 rows has a non-empty assistant answer"):
        tokenize_chat(data.select([1, 2]), tokenizer)
    with pytest.raises(ValueError, match="Chat content must be a string, got list"):
        tokenize_chat(datasets.Dataset.from_list([{"prompt": ["a", "b"], "response": "x"}]), tokenizer)
    with pytest.raises(ValueError, match="empty dataset"):
        tokenize_chat(data.select([]), tokenizer)
