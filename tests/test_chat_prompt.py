"""Prompt distillation for chat models (``teacher_prompt_as="system"``): the long prompt becomes the teacher's system
message, and the teacher's predictions of the student's assistant tokens are exactly those it makes on the
conversation rendered with that system message."""

import datasets
import pytest
import torch
from llm_assets import tiny_chat_llama
from transformers import DataCollatorForSeq2Seq

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.chat import tokenize_chat
from hf_distill.teacher_prompt import TeacherPrompt

PROMPT = "Answer like a pirate, in one short sentence, and always end with the word arr."
# A template that, like SmolLM2's, writes a default system turn when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nyou are helpful</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
ROWS = [
    {"prompt": "the capital of france?", "response": "paris"},
    {"prompt": "hello world, how are you today?", "response": "fine, thank you"},
    {"prompt": "a gripping film?", "response": "funny, with a dull middle"},
]


def _batch(tokenizer, system_prompt=None):
    data = tokenize_chat(datasets.Dataset.from_list(ROWS), tokenizer, max_length=128, system_prompt=system_prompt)
    features = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in data.dataset]
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM_TEMPLATE], ids=["no-default-system", "default-system"])
def test_system_prompt_realignment_is_exact(template):
    teacher, tokenizer = tiny_chat_llama(layers=2, seed=1)
    if template is not None:
        tokenizer.chat_template = template
    prompt = TeacherPrompt(PROMPT, tokenizer, "system")
    assert prompt.length > 15 and (prompt.replaced.numel() > 0) == (template is not None)
    student_batch = _batch(tokenizer)
    teacher_inputs = prompt.prepend(student_batch)
    direct = _batch(tokenizer, system_prompt=PROMPT)  # what the teacher reads, rendered by the template itself
    assert torch.equal(teacher_inputs["input_ids"], direct["input_ids"])
    with torch.no_grad():
        realigned = prompt.drop_prompt_positions(
            teacher(input_ids=teacher_inputs["input_ids"], attention_mask=teacher_inputs["attention_mask"]).logits
        )
        reference = teacher(input_ids=direct["input_ids"], attention_mask=direct["attention_mask"]).logits
    assert realigned.shape[:2] == student_batch["input_ids"].shape
    # Position i predicts token i + 1: compare the predictions of every scored (assistant) token.
    student_scored = student_batch["labels"][:, 1:] != -100
    teacher_scored = direct["labels"][:, 1:] != -100
    torch.testing.assert_close(
        realigned[:, :-1][student_scored], reference[:, :-1][teacher_scored], atol=1e-5, rtol=1e-5
    )


def test_system_prompt_errors():
    _, tokenizer = tiny_chat_llama(layers=1)
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    prompt = TeacherPrompt(PROMPT, tokenizer, "system")
    own_system = _batch(tokenizer, system_prompt="be terse")  # rows that do not open with the default block
    with pytest.raises(ValueError, match="does not start with the chat template's own opening"):
        prompt.prepend(own_system)
    scored = _batch(tokenizer)
    scored["labels"] = scored["input_ids"].clone()  # every token scored, the replaced block included
    with pytest.raises(ValueError, match="must not be scored"):
        prompt.prepend(scored)
    plain = tiny_chat_llama(layers=1)[1]
    plain.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        TeacherPrompt(PROMPT, plain, "system")
    with pytest.raises(ValueError, match="teacher_prompt_as must be 'prefix' or 'system'"):
        DistillationConfig(output_dir="x", teacher_prompt=PROMPT, teacher_prompt_as="user")


def test_chat_prompt_distillation_trains_a_student_towards_the_prompted_teacher(tmp_path):
    teacher, tokenizer = tiny_chat_llama(layers=2, seed=2)
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    student, _ = tiny_chat_llama(layers=1, seed=3)
    train = tokenize_chat(datasets.Dataset.from_list(ROWS * 4), tokenizer, max_length=128).dataset
    args = DistillationConfig(
        output_dir=str(tmp_path / "kd"),
        alpha=1.0,
        temperature=1.0,
        teacher_prompt=PROMPT,
        teacher_prompt_as="system",
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train.select_columns(["input_ids", "attention_mask", "labels"]),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    losses = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    assert trainer.teacher_prompt.length > 15  # tokens each student request no longer carries
