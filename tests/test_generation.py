"""Sequence-level KD: a tiny Llama teacher answers chat prompts in batches; the student trains on its answers."""

import copy

import datasets
import pytest
import torch
from conftest import minilm_tokenizer
from test_chat import TEMPLATE

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.chat import tokenize_chat
from hf_distill.generation import generate_responses


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(minilm_tokenizer())
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.sep_token_id,
        )
    ).eval()
    prompts = datasets.Dataset.from_dict({"prompt": ["name a color", "say hi to the team please", "count"]})
    return teacher, tok, prompts


def test_batched_greedy_generation_equals_one_by_one(setup, tmp_path):
    teacher, tok, prompts = setup
    batched = generate_responses(teacher, tok, prompts, max_new_tokens=6, batch_size=3, save_path=tmp_path / "gen")
    single = generate_responses(teacher, tok, prompts, max_new_tokens=6, batch_size=1)
    assert batched["response"] == single["response"]  # left padding does not change greedy answers
    assert all(r for r in batched["response"]) and batched["prompt"] == prompts["prompt"]
    assert datasets.load_from_disk(str(tmp_path / "gen"))["response"] == batched["response"]
    with pytest.raises(ValueError, match="exists"):
        generate_responses(teacher, tok, prompts, max_new_tokens=2, save_path=tmp_path / "gen")


def test_sampling_is_seeded(setup):
    teacher, tok, prompts = setup
    kwargs = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "top_k": 50}
    first = generate_responses(teacher, tok, prompts, seed=3, **kwargs)["response"]
    assert generate_responses(teacher, tok, prompts, seed=3, **kwargs)["response"] == first


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_student_trains_on_teacher_responses(setup, tmp_path, alpha):
    teacher, tok, prompts = setup
    generated = generate_responses(teacher, tok, prompts, max_new_tokens=6, batch_size=2)
    data = tokenize_chat(generated, tok, max_length=64).dataset
    labelled = [t for t in data[0]["labels"] if t != -100]
    assert tok.decode(labelled).startswith(generated[0]["response"][:5])  # the labels are the teacher's words
    from transformers import DataCollatorForSeq2Seq

    args = DistillationConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=3, alpha=alpha, report_to="none"
    )
    trainer = DistillationTrainer(
        model=create_student(teacher, num_layers=1),
        teacher=teacher,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tok),
    )
    assert trainer.train().training_loss > 0


def test_cli_generate_from_a_gguf_teacher(tmp_path, capsys):
    import json

    from gguf_writer import write_tiny_gguf

    from hf_distill.cli import main

    path = tmp_path / "teacher.gguf"
    write_tiny_gguf(path)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": "ref"}) + "\n" for p in ("hello", "tea")))
    # The tiny GGUF tokenizer has no chat template: a clear error, nothing written.
    assert main(["generate", str(path), str(rows), str(tmp_path / "gen"), "--max-new-tokens", "3"]) == 2
    assert "no chat template" in capsys.readouterr().err and not (tmp_path / "gen").exists()
    assert (tmp_path / "gguf_teacher" / "teacher" / "model.safetensors").is_file()  # converted next to the output
