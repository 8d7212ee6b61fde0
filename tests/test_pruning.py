"""Width-reduced students: Minitron-style structured pruning in create_student, and cross-width matching defaults."""

import logging
import math

import pytest
import torch
from conftest import first_token_rule, lm_dataset, tiny_bert, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.cache import pad_batch
from hf_distill.export.onnx import export_onnx
from hf_distill.intermediate import IntermediateMatcher
from hf_distill.pruning import Importance, Widths, calibration_batches, choose_units
from hf_distill.tasks import infer_task

IDS = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return RobertaForSequenceClassification(config)


def tiny_qwen2(tie: bool = True, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, pad_token_id=0,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def tiny_mistral() -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4,
    )  # fmt: skip
    return MistralForCausalLM(config)


def _bert_mlm() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return BertForMaskedLM(config)


def _out(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


CALIBRATION = first_token_rule(48, 5)
MODELS = {
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "bert_mlm": _bert_mlm,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nothing_pruned_reproduces_the_teacher(name):
    teacher = MODELS[name]().eval()
    c = teacher.config
    full = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_attention_heads=4)
    student = create_student(teacher, calibration_data=CALIBRATION, **full)
    assert torch.equal(_out(student), _out(teacher))
    # Full width after a layer cut equals the layer cut alone: width pruning composes with depth.
    cut = create_student(teacher, num_layers=2, calibration_data=CALIBRATION, **full)
    # (For causal LMs the calibration data also chose the layers: compare with a cut of the same layers.)
    assert torch.equal(_out(cut), _out(create_student(teacher, layers=cut.config.hf_distill_teacher_layers)))


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("bert", {"hidden_size": 16}, (16, 32, 2, 2)),  # BERT: heads = hidden / head size 8, MLP scaled with hidden
        ("roberta", {"hidden_size": 24, "intermediate_size": 40}, (24, 40, 3, 3)),
        ("bert_mlm", {"hidden_size": 16, "intermediate_size": 8}, (16, 8, 2, 2)),
        ("llama", {"hidden_size": 16}, (16, 32, 4, 2)),  # decoders keep their heads unless asked
        ("llama", {"num_attention_heads": 2}, (32, 64, 2, 1)),  # GQA ratio 2 kept: one key/value head
        ("qwen2", {"hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2}, (24, 48, 2, 2)),
        ("mistral", {"hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2}, (16, 16, 2, 1)),
    ],
)
def test_pruned_config_and_weight_shapes(name, kwargs, expected):
    teacher = MODELS[name]()
    student = create_student(teacher, num_layers=2, calibration_data=CALIBRATION, **kwargs)
    c = student.config
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, kv) == expected
    assert c.num_hidden_layers == 2 and c.hf_distill_pruning["importance"] == "activations"
    head_dim = 8  # the teacher's 32 / 4, kept
    assert getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) == head_dim
    norms = [m for m in student.modules() if "Norm" in type(m).__name__]
    assert norms and all(m.weight.shape == (c.hidden_size,) for m in norms)
    assert student.get_input_embeddings().weight.shape[1] == c.hidden_size
    assert _out(student).shape == _out(teacher).shape


def _bert_with_clear_winners() -> tuple:
    """A tiny BERT where hidden channels 3, 17, ..., heads 1 and 2 and some neurons stand out in activations."""
    teacher = tiny_bert(num_layers=2).eval()
    hidden = torch.tensor([3, 5, 11, 17, 20, 23, 28, 30])
    neurons = torch.tensor([2, 9, 40, 63])
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias[hidden] += 4.0  # large |LN output| on these channels everywhere
        for layer in teacher.bert.encoder.layer:
            value = layer.attention.self.value
            value.weight[8:24] *= 20.0  # heads 1 and 2 (rows 8..23, head size 8) output much more
            value.bias[8:24] += 3.0
            layer.intermediate.dense.bias[neurons] += 6.0  # GELU(x + 6) ≈ x + 6: active neurons
            # A decoy: the largest weights of all, but pushed far negative so that GELU silences it.
            layer.intermediate.dense.weight[50] *= 30.0
            layer.intermediate.dense.bias[50] = -1e4
    return teacher, hidden, neurons


def test_kept_units_are_the_most_important_on_calibration_data():
    teacher, hidden, neurons = _bert_with_clear_winners()
    student = create_student(
        teacher, hidden_size=16, intermediate_size=4, calibration_data=CALIBRATION
    )  # 2 heads of size 8
    t_layer, s_layer = teacher.bert.encoder.layer[1], student.bert.encoder.layer[1]
    t_words, s_words = teacher.bert.embeddings.word_embeddings.weight, student.bert.embeddings.word_embeddings.weight
    kept_hidden = [next(i for i in range(32) if torch.equal(t_words[:, i], s_words[:, j])) for j in range(16)]
    assert set(hidden.tolist()) <= set(kept_hidden) and kept_hidden == sorted(kept_hidden)
    assert torch.equal(s_layer.intermediate.dense.bias, t_layer.intermediate.dense.bias[neurons])
    columns = torch.tensor(kept_hidden)
    assert torch.equal(s_layer.attention.self.value.weight, t_layer.attention.self.value.weight[8:24][:, columns])
    assert torch.equal(s_layer.output.dense.weight, t_layer.output.dense.weight[columns][:, neurons])


def test_without_calibration_falls_back_to_weight_magnitude_and_says_so(caplog):
    teacher, _, _ = _bert_with_clear_winners()
    with caplog.at_level(logging.WARNING, logger="hf_distill.student"):
        student = create_student(teacher, hidden_size=16, intermediate_size=4)
    assert "no calibration_data" in caplog.text and "weight magnitude" in caplog.text
    assert student.config.hf_distill_pruning["importance"] == "weight magnitude"
    # Weight magnitude keeps the heavy but silent decoy neuron 50, which activation importance drops.
    decoy = teacher.bert.encoder.layer[0].intermediate.dense.bias[50]
    assert decoy in student.bert.encoder.layer[0].intermediate.dense.bias
    calibrated = create_student(teacher, hidden_size=16, intermediate_size=4, calibration_data=CALIBRATION)
    assert decoy not in calibrated.bert.encoder.layer[0].intermediate.dense.bias


def test_llama_keeps_the_important_key_value_group_and_hidden_channels():
    teacher = tiny_llama(num_layers=2).eval()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[8:16] *= 25.0  # key/value head 1 -> query heads 2 and 3 dominate
        for module in teacher.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight[[1, 4, 9, 30]] *= 10.0
    student = create_student(teacher, hidden_size=4, num_attention_heads=2, calibration_data=lm_dataset(16, 0))
    assert student.config.num_key_value_heads == 1 and student.config.head_dim == 8
    t_attn, s_attn = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    columns = torch.tensor([1, 4, 9, 30])
    assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[16:32][:, columns])
    assert torch.equal(s_attn.v_proj.weight, t_attn.v_proj.weight[8:16][:, columns])
    assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight[columns][:, 16:32])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[columns])


def test_gqa_choice_ranks_groups_then_query_heads_inside_them():
    teacher = Widths(hidden=8, intermediate=8, heads=6, kv_heads=3, head_dim=2)  # 2 query heads per group
    scores = torch.tensor([0.1, 0.2, 5.0, 0.3, 1.0, 1.5])  # groups: 0.3, 5.3, 2.5
    importance = Importance(torch.arange(8.0), [scores], [torch.arange(8.0)], "activations")
    kept = choose_units(importance, teacher, Widths(4, 2, heads=2, kv_heads=2, head_dim=2))
    assert kept.kv_heads[0].tolist() == [1, 2] and kept.heads[0].tolist() == [2, 5]
    assert kept.hidden.tolist() == [4, 5, 6, 7] and kept.neurons[0].tolist() == [6, 7]
    kept = choose_units(importance, teacher, Widths(4, 2, heads=4, kv_heads=2, head_dim=2))
    assert kept.heads[0].tolist() == [2, 3, 4, 5]


def test_tied_lm_head_is_sliced_with_the_embeddings_and_stays_tied():
    teacher = tiny_qwen2(tie=True)
    student = create_student(teacher, num_layers=2, hidden_size=16, calibration_data=lm_dataset(8, 1))
    assert student.lm_head.weight.shape == (30, 16)
    assert student.lm_head.weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_pruned_student_saves_and_loads_as_a_plain_model(name, tmp_path):
    auto = AutoModelForSequenceClassification if name == "bert" else AutoModelForCausalLM
    student = create_student(MODELS[name](), num_layers=2, hidden_size=16, calibration_data=CALIBRATION)
    student.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path)
    assert loaded.config.hidden_size == 16 and torch.allclose(_out(loaded), _out(student), atol=1e-6)


def test_pruned_student_exports_to_onnx(tmp_path):
    student = create_student(tiny_bert(num_layers=2), hidden_size=16, calibration_data=CALIBRATION)
    report = export_onnx(
        student, tmp_path / "onnx", variants=["fp32", "int8_dynamic"], validation_data=first_token_rule(8, 2),
        max_metric_drop=100.0,
    )  # fmt: skip
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["fp32"]["max_abs_diff"] < 1e-4 and rows["int8_dynamic"]["passed"]


def test_bad_width_requests_raise_clear_errors():
    bert, llama = tiny_bert(num_layers=2), tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match=r"hidden_size must be an int in \[1, 32\]"):
        create_student(bert, hidden_size=64)
    with pytest.raises(ValueError, match=r"intermediate_size must be an int in \[1, 64\]"):
        create_student(bert, intermediate_size=0)
    with pytest.raises(ValueError, match=r"multiple of 8 \(e\.g\. 16\)"):
        create_student(bert, hidden_size=20)
    with pytest.raises(ValueError, match="must equal hidden_size=16; got 4 heads"):
        create_student(bert, hidden_size=16, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads is for GQA decoders"):
        create_student(bert, hidden_size=16, num_key_value_heads=2)
    with pytest.raises(ValueError, match="not a multiple of the teacher's 2 query heads per key/value head"):
        create_student(llama, num_attention_heads=3)
    with pytest.raises(ValueError, match="cannot merge groups"):
        create_student(llama, num_attention_heads=4, num_key_value_heads=1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="supports model_type bert, llama, mistral, qwen2, roberta"):
        create_student(gpt2, hidden_size=16)
    with pytest.raises(ValueError, match="calibration_data ranks units for width pruning"):
        create_student(bert, num_layers=1, calibration_data=CALIBRATION)
    with pytest.raises(ValueError, match="no input_ids column"):
        create_student(bert, hidden_size=16, calibration_data=CALIBRATION.remove_columns("input_ids"))
    with pytest.raises(ValueError, match="must be a tokenized datasets.Dataset"):
        create_student(bert, hidden_size=16, calibration_data="some text")
    with pytest.raises(ValueError, match="calibration_data is empty"):
        create_student(bert, hidden_size=16, calibration_data=[])


def test_narrow_student_defaults_to_projection_and_value_relation():
    teacher = tiny_bert(num_layers=2)
    args = DistillationConfig(output_dir="unused", hidden_loss_weight=1.0, attention_loss_weight=1.0, report_to="none")
    task = infer_task(teacher)
    pruned = create_student(teacher, hidden_size=16, calibration_data=CALIBRATION)  # 2 heads: fewer and narrower
    for narrow in (pruned, tiny_bert(num_layers=2, hidden=16)):  # the second: same head count, half the width
        matcher = IntermediateMatcher(narrow, teacher, args, task)
        assert matcher.needs_values and not matcher.needs_attentions and matcher.projections is not None
    same = IntermediateMatcher(create_student(teacher, num_layers=1), teacher, args, task)
    assert same.needs_attentions and not same.needs_values and same.projections is None
    explicit = DistillationConfig(output_dir="unused", attention_loss_weight=1.0, attention_loss="attention_kl")
    assert IntermediateMatcher(pruned, teacher, explicit, task).needs_attentions  # an explicit choice is kept


def test_pruned_student_distils_with_hidden_and_attention_defaults(tmp_path):
    teacher = tiny_bert(num_layers=2)
    student = create_student(teacher, num_layers=1, hidden_size=16, calibration_data=CALIBRATION)
    args = DistillationConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, hidden_loss_weight=1.0,
        attention_loss_weight=1.0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=first_token_rule(24, 3), data_collator=pad_batch
    )
    trainer.train()
    logged = [row for row in trainer.state.log_history if "hidden_loss" in row]
    assert logged and all(math.isfinite(row["hidden_loss"]) and row["attention_loss"] >= 0 for row in logged)


def test_calibration_data_as_dataset_list_of_dicts_or_without_mask_give_the_same_student():
    teacher = tiny_bert(num_layers=2)
    reference = create_student(teacher, hidden_size=16, calibration_data=CALIBRATION, calibration_batch_size=8)
    batches = calibration_batches(CALIBRATION, teacher, 0, batch_size=8, max_batches=32)
    as_lists = [{k: v.tolist() for k, v in b.items()} for b in batches]
    for data in (as_lists, CALIBRATION.remove_columns("attention_mask")):
        student = create_student(teacher, hidden_size=16, calibration_data=data, calibration_batch_size=8)
        expected = reference.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in student.state_dict().items())
    with pytest.raises(ValueError, match="Every calibration batch needs input_ids"):
        create_student(teacher, hidden_size=16, calibration_data=[{"attention_mask": [[1, 1]]}])
    with pytest.raises(ValueError, match="must be >= 1"):
        create_student(teacher, hidden_size=16, calibration_data=CALIBRATION, num_calibration_batches=0)
