"""Layer selection in create_student: measured blocks beat identity-like ones; uniform stays; bad values raise."""

import pytest
import torch
from conftest import lm_dataset, tiny_bert, tiny_llama
from transformers import (
    AutoConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_distill import create_student, depth
from hf_distill.depth import calibration_nll, only_blocks

TRAINED = {0: 0, 3: 1, 5: 2}  # teacher block -> trained block; blocks 1, 2 and 4 are identities


def _identity_llama() -> LlamaForCausalLM:
    """Six blocks: three trained on a next-token pattern (0, 3, 5) and three whose output projections are zero, so
    that they return their input unchanged (1, 2, 4)."""
    small = tiny_llama(num_layers=3)
    data = lm_dataset(32, 1)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    optimizer = torch.optim.Adam(small.parameters(), lr=1e-2)
    for _ in range(40):
        small(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    config = small.config.to_dict() | {"num_hidden_layers": 6}
    teacher = LlamaForCausalLM(type(small.config).from_dict(config))
    state = {}
    for key, value in small.state_dict().items():
        if not key.startswith("model.layers."):
            state[key] = value
            continue
        index, rest = key.removeprefix("model.layers.").split(".", 1)
        for block in range(6):
            if TRAINED.get(block, 0) == int(index):
                zero = block not in TRAINED and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                state[f"model.layers.{block}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    teacher.load_state_dict(state, strict=True)
    return teacher.eval()


@pytest.fixture(scope="module")
def teacher():
    return _identity_llama()


CALIBRATION = lm_dataset(16, 2)


@pytest.mark.parametrize("method", ["importance", "block_influence", None])
def test_selection_keeps_the_non_trivial_blocks(teacher, method, tmp_path):
    before = calibration_nll(teacher, [{k: torch.tensor(CALIBRATION[k]) for k in ("input_ids", "labels")}])
    student = create_student(teacher, num_layers=3, layer_selection=method, calibration_data=CALIBRATION)
    assert student.config.hf_distill_teacher_layers == [0, 3, 5]
    expected = "block_influence" if method == "block_influence" else "greedy"  # importance (the default) = greedy
    assert student.config.hf_distill_layer_selection["method"] == expected
    # Dropping identities changes nothing, and the teacher is left whole.
    assert calibration_nll(student.eval(), [{k: torch.tensor(CALIBRATION[k]) for k in ("input_ids", "labels")}]) == (
        pytest.approx(before, rel=1e-5)
    )
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 6
    student.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert saved.hf_distill_teacher_layers == [0, 3, 5] and saved.hf_distill_layer_selection["method"] == expected


def test_contiguous_drops_the_identity_run(teacher):
    student = create_student(teacher, num_layers=4, layer_selection="contiguous", calibration_data=CALIBRATION)
    assert student.config.hf_distill_teacher_layers == [0, 3, 4, 5]
    assert student.config.hf_distill_layer_selection["dropped"] == "1-2"


def test_uniform_still_works_and_width_pruning_follows_the_selection(teacher):
    assert create_student(teacher, num_layers=3).config.hf_distill_teacher_layers == [0, 2, 5]
    uniform = create_student(teacher, num_layers=3, layer_selection="uniform", hidden_size=16)
    assert uniform.config.hf_distill_teacher_layers == [0, 2, 5] and uniform.config.hidden_size == 16
    narrow = create_student(teacher, num_layers=3, hidden_size=16, calibration_data=CALIBRATION)
    assert narrow.config.hf_distill_teacher_layers == [0, 3, 5] and narrow.config.hidden_size == 16


def test_calibration_nll_equals_the_model_loss(teacher):
    batch = {k: torch.tensor(CALIBRATION[k][:4]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        loss = teacher(**batch).loss
    assert calibration_nll(teacher, [batch]) == pytest.approx(float(loss), rel=1e-5)
    with only_blocks(teacher, "model.layers", [0, 3, 5]), torch.no_grad():
        assert len(teacher.model.layers) == 3
    assert len(teacher.model.layers) == 6


def test_bad_selection_requests_raise(teacher):
    with pytest.raises(ValueError, match=r"layer_selection must be one of 'importance', 'uniform'.*got 'best'"):
        create_student(teacher, num_layers=3, layer_selection="best", calibration_data=CALIBRATION)
    with pytest.raises(ValueError, match="measures the blocks on calibration_data"):
        create_student(teacher, num_layers=3, layer_selection="importance")
    with pytest.raises(ValueError, match="pass num_layers"):
        create_student(teacher, layers=[0, 1], layer_selection="greedy", calibration_data=CALIBRATION)
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[1, 6\]"):
        create_student(teacher, num_layers=7, calibration_data=CALIBRATION)
    with pytest.raises(ValueError, match="calibration_data ranks units for width pruning"):
        create_student(teacher, num_layers=3, layer_selection="uniform", calibration_data=CALIBRATION)
    bert = tiny_bert(num_layers=4)
    with pytest.raises(ValueError, match="needs a causal LM"):
        create_student(bert, num_layers=2, layer_selection="importance", calibration_data=CALIBRATION)
    ids = CALIBRATION.remove_columns("labels")
    student = create_student(bert, num_layers=2, layer_selection="block_influence", calibration_data=ids)
    assert len(student.config.hf_distill_teacher_layers) == 2


def _random_lm(kind: str) -> torch.nn.Module:
    """Eight random blocks of a tiny Llama, Qwen2 (sliding-window layers mixed in: per-position layer types) or
    GPT-2: random blocks, so every removal changes the perplexity and the greedy order is non-trivial."""
    torch.manual_seed(3)
    shapes = dict(vocab_size=24, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=8)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=24, n_embd=32, n_layer=8, n_head=4, n_positions=64)
        return GPT2LMHeadModel(config).eval()
    if kind == "qwen2":
        types = ["sliding_attention" if i % 3 == 1 else "full_attention" for i in range(8)]
        config = Qwen2Config(**shapes, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                             layer_types=types)  # fmt: skip
        return Qwen2ForCausalLM(config).eval()
    return LlamaForCausalLM(LlamaConfig(**shapes, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_replay_equals_full_passes_with_fewer_block_calls(kind, monkeypatch):
    model = _random_lm(kind)
    stack = "transformer.h" if kind == "gpt2" else "model.layers"
    rows = lm_dataset(6, 4, seq_len=10)
    batches = [
        {"input_ids": torch.tensor(rows["input_ids"][i : i + 3]),
         "attention_mask": torch.tensor([[0] * 2 + [1] * 8] * 3),  # left padding
         "labels": torch.tensor([[-100] * 4 + r[4:] for r in rows["labels"][i : i + 3]])}
        for i in (0, 3)
    ]  # fmt: skip
    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    for block in model.get_submodule(stack):
        block.register_forward_hook(count)
    results = []
    for budget in (depth.REPLAY_BUDGET_BYTES, 0):  # 0: the cache never fits, full passes
        monkeypatch.setattr(depth, "REPLAY_BUDGET_BYTES", budget)
        calls["n"] = 0
        results.append((depth.greedy(model, stack, 3, batches, candidates=3), calls["n"]))
    (replayed, replayed_calls), (full, full_calls) = results
    assert replayed.layers == full.layers and len(replayed.layers) == 3
    assert replayed.scores["removed_in_order"] == full.scores["removed_in_order"]
    after_replay, after_full = (c.scores["perplexity_after_each_removal"] for c in (replayed, full))
    assert after_replay == pytest.approx(after_full, rel=1e-6)
    assert len(set(after_full)) == len(after_full)  # distinct values: the comparison is not of ties
    assert replayed_calls < 0.7 * full_calls  # 134 vs 210 block calls for the Llama
    # The model is whole again afterwards
    assert len(model.get_submodule(stack)) == 8 and model.config.num_hidden_layers == 8
