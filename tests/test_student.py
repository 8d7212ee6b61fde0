"""create_student: the student's copied layers equal the teacher's chosen layers."""

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForTokenClassification,
)

from hf_distill import create_student
from hf_distill.student import choose_layers


def _assert_copied(teacher, student, stack, layers):
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(stack + "."):
            index, rest = key[len(stack) + 1 :].split(".", 1)
            source = f"{stack}.{layers[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_state[source]), key


def test_bert_uniform_layers_copied():
    teacher = tiny_bert(num_layers=6)
    student = create_student(teacher, num_layers=3)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    assert student.config.hf_distill_teacher_layers == [0, 2, 5] == choose_layers(6, 3)
    _assert_copied(teacher, student, "bert.encoder.layer", [0, 2, 5])
    assert student.config.id2label == teacher.config.id2label
    ids = torch.randint(3, 20, (2, 7))
    assert student(input_ids=ids).logits.shape == (2, 2)


def test_llama_explicit_layers_copied_and_runs():
    teacher = tiny_llama(num_layers=4)
    student = create_student(teacher, layers=[1, 3])
    _assert_copied(teacher, student, "model.layers", [1, 3])
    ids = torch.randint(3, 20, (2, 7))
    assert student(input_ids=ids).logits.shape == (2, 7, teacher.config.vocab_size)
    # A 'student' with every layer is the teacher itself.
    full = create_student(teacher, num_layers=4)
    assert torch.allclose(full(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)


def test_gpt2_qwen2_roberta_are_cut_by_introspection():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=32, n_layer=4, n_head=4, n_positions=32))
    student = create_student(gpt2, num_layers=2)
    _assert_copied(gpt2, student, "transformer.h", [0, 3])
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # tying survives
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=30,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    q_student = create_student(qwen, layers=[0, 2])
    _assert_copied(qwen, q_student, "model.layers", [0, 2])
    assert len(q_student.config.layer_types) == 2
    roberta = RobertaForTokenClassification(
        RobertaConfig(
            vocab_size=30,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
        )
    )
    r_student = create_student(roberta, num_layers=1)
    _assert_copied(roberta, r_student, "roberta.encoder.layer", [2])


def test_saved_student_loads_as_plain_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    student = create_student(tiny_bert(num_layers=4), num_layers=2)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ids = torch.randint(3, 20, (2, 5))
    assert torch.allclose(loaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits, atol=1e-6)


def test_bad_requests_raise_clear_errors():
    teacher = tiny_bert(num_layers=4)
    with pytest.raises(ValueError, match="exactly one of num_layers"):
        create_student(teacher)
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[1, 4\]"):
        create_student(teacher, num_layers=5)
    with pytest.raises(ValueError, match="strictly increasing"):
        create_student(teacher, layers=[2, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        create_student(teacher, layers=[0, 4])
    with pytest.raises(ValueError, match="PreTrainedModel"):
        create_student(torch.nn.Linear(2, 2), num_layers=1)
    teacher.config.num_hidden_layers = 7  # config no longer describes the module tree
    with pytest.raises(ValueError, match="no list of 7 identical blocks"):
        create_student(teacher, num_layers=2)
